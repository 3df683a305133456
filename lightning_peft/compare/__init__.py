"""lightning-peft compare: every PEFT method on one task, measured side by side."""
