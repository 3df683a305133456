"""The machinery every PEFT method shares: targeting, injection, the callback, checkpoints."""
