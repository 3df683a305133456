"""A catalogue of tiny, randomly initialised models, one per architecture family, for the architecture matrix.

Every transformers model is built from a config (hidden 32, 2 layers, 4 heads, vocab 128) and never downloaded.
``heads`` holds dotted-name components: a module is an output head when a component of its name is in the set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

VOCAB = 128
BATCH = 2
SEQ = 8
LABELS = 3
LM_HEAD = frozenset({"lm_head"})
CLASSIFIER = frozenset({"classifier"})
HEAD = frozenset({"head"})

# Shared by the Llama-style decoder configs: 4 query heads of width 8 over 2 key/value heads.
_CAUSAL: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
_ENCODER: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=64, num_labels=LABELS)
_HYBRID = ["sliding_attention", "full_attention"]  # one sliding-window layer, one global layer


@dataclass(frozen=True)
class Family:
    """One architecture: how to build it, feed it, read its output, and which modules are its output heads."""

    name: str
    kind: str  # decoder, encoder, encoder-decoder, vision, dual-encoder, speech, moe or torch
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, torch.Tensor]]
    output: Callable[[Any], torch.Tensor]
    heads: frozenset[str]
    token_model: bool
    lora_targets: Any = "all-linear"  # LoRA's targets in the matrix: "all-linear" where there are linear layers


def _generator() -> torch.Generator:
    """A fresh generator seeded 0, so every call of an ``inputs`` function gives identical tensors."""
    return torch.Generator().manual_seed(0)


def _ids(g: torch.Generator, length: int = SEQ) -> torch.Tensor:
    """Token ids above the special ids 0-3 (pad, bos, eos) so no model masks or pools on them."""
    return torch.randint(4, VOCAB, (BATCH, length), generator=g)


def _token_inputs() -> dict[str, torch.Tensor]:
    """A batch of token ids."""
    return {"input_ids": _ids(_generator())}


def _seq2seq_inputs() -> dict[str, torch.Tensor]:
    """Encoder token ids and decoder token ids."""
    g = _generator()
    return {"input_ids": _ids(g), "decoder_input_ids": _ids(g, SEQ // 2)}


def _image_inputs() -> dict[str, torch.Tensor]:
    """A batch of 16x16 RGB images."""
    return {"pixel_values": torch.randn(BATCH, 3, 16, 16, generator=_generator())}


def _clip_inputs() -> dict[str, torch.Tensor]:
    """Captions and images for CLIP."""
    g = _generator()
    return {"input_ids": _ids(g), "pixel_values": torch.randn(BATCH, 3, 16, 16, generator=g)}


def _whisper_inputs() -> dict[str, torch.Tensor]:
    """A log-mel spectrogram (16 bins x 16 frames) and decoder token ids."""
    g = _generator()
    return {"input_features": torch.randn(BATCH, 16, 16, generator=g), "decoder_input_ids": _ids(g, SEQ // 2)}


def _conv_inputs() -> dict[str, torch.Tensor]:
    """A batch of 8x8 single-channel images."""
    return {"x": torch.randn(BATCH, 1, 8, 8, generator=_generator())}


def _logits(out: Any) -> torch.Tensor:
    """The ``logits`` of a transformers model output."""
    return out.logits


def _logits_per_image(out: Any) -> torch.Tensor:
    """CLIP's image-to-text similarity logits."""
    return out.logits_per_image


def _tensor(out: torch.Tensor) -> torch.Tensor:
    """A plain module's output, already a tensor."""
    return out


# Decoders.


def llama() -> nn.Module:
    """Llama: grouped-query attention, SwiGLU MLP."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_CAUSAL))


def mistral() -> nn.Module:
    """Mistral: Llama with sliding-window attention (window 4, shorter than the sequence)."""
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**_CAUSAL, sliding_window=4))


def qwen2() -> nn.Module:
    """Qwen2: Llama with biased q/k/v projections."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**_CAUSAL))


def qwen3() -> nn.Module:
    """Qwen3: RMS-normed queries and keys, explicit head_dim."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(**_CAUSAL, head_dim=8))


def gemma() -> nn.Module:
    """Gemma: lm_head tied to the input embeddings."""
    from transformers import GemmaConfig, GemmaForCausalLM

    return GemmaForCausalLM(GemmaConfig(**_CAUSAL, head_dim=8, tie_word_embeddings=True))


def gemma2() -> nn.Module:
    """Gemma2: alternating sliding-window and global attention, logit soft-capping, tied lm_head."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(**_CAUSAL, head_dim=8, query_pre_attn_scalar=8, sliding_window=4, layer_types=_HYBRID)
    return Gemma2ForCausalLM(config)


def phi3() -> nn.Module:
    """Phi-3: fused qkv_proj and gate_up_proj."""
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(**_CAUSAL, pad_token_id=0, eos_token_id=2))


def gpt2() -> nn.Module:
    """GPT-2: transformers Conv1D layers (weight stored in x out), fused c_attn, tied lm_head."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                        eos_token_id=2)
    return GPT2LMHeadModel(config)


def gpt_neox() -> nn.Module:
    """GPT-NeoX: fused query_key_value, parallel residual, partial rotary embeddings."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=64)
    return GPTNeoXForCausalLM(config)


def opt() -> nn.Module:
    """OPT: learned positions, biased projections, tied lm_head."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=64)
    return OPTForCausalLM(config)


def bloom() -> nn.Module:
    """BLOOM: fused query_key_value, ALiBi positions, tied lm_head."""
    from transformers import BloomConfig, BloomForCausalLM

    return BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4))


# Encoders.


def bert() -> nn.Module:
    """BERT: post-norm encoder, pooler, Linear classifier."""
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(**_ENCODER))


def roberta() -> nn.Module:
    """RoBERTa: a two-layer classifier head (classifier.dense, classifier.out_proj)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    return RobertaForSequenceClassification(RobertaConfig(**_ENCODER))


def deberta_v2() -> nn.Module:
    """DeBERTa-v2: disentangled relative-position attention with a shared position projection."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    config = DebertaV2Config(**_ENCODER, relative_attention=True, pos_att_type=["p2c", "c2p"],
                             position_biased_input=False)
    return DebertaV2ForSequenceClassification(config)


def distilbert() -> nn.Module:
    """DistilBERT: q_lin/k_lin/v_lin naming, pre_classifier before the classifier."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=2, n_heads=4,
                              max_position_embeddings=64, num_labels=LABELS)
    return DistilBertForSequenceClassification(config)


# Encoder-decoders.


def t5() -> nn.Module:
    """T5: relative position buckets, no biases, separate encoder and decoder stacks."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16)
    return T5ForConditionalGeneration(config)


def bart() -> nn.Module:
    """BART: encoder, decoder with cross-attention, tied lm_head."""
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
    return BartForConditionalGeneration(config)


# Vision, dual encoder, speech.


def vit() -> nn.Module:
    """ViT: a Conv2d patch embedding (16x16 image, 8x8 patches) and a Linear classifier."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                       patch_size=8, encoder_stride=8, num_labels=LABELS)
    return ViTForImageClassification(config)


def clip() -> nn.Module:
    """CLIP: a text tower and a vision tower joined by text_projection and visual_projection."""
    from transformers import CLIPConfig, CLIPModel

    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=16)
    text = dict(tower, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    vision = dict(tower, image_size=16, patch_size=8)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))


def whisper() -> nn.Module:
    """Whisper: Conv1d audio stem (stride 2: 16 mel frames -> 8 positions), decoder with tied proj_out."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(vocab_size=VOCAB, num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, max_source_positions=8, max_target_positions=64, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, begin_suppress_tokens=None)
    return WhisperForConditionalGeneration(config)


# Mixtures of experts: transformers 5 stores each layer's experts as fused 3-D parameters.


def mixtral() -> nn.Module:
    """Mixtral: 4 experts, top-2 routing, fused gate_up_proj and down_proj expert tensors."""
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(**_CAUSAL, num_local_experts=4, num_experts_per_tok=2))


def qwen3_moe() -> nn.Module:
    """Qwen3-MoE: 4 experts of width 48, top-2 routing, every layer sparse."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(**_CAUSAL, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                            decoder_sparse_step=1, mlp_only_layers=[])
    return Qwen3MoeForCausalLM(config)


def olmoe() -> nn.Module:
    """OLMoE: 4 experts, top-2 routing, RMS-normed queries and keys."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    return OlmoeForCausalLM(OlmoeConfig(**_CAUSAL, num_experts=4, num_experts_per_tok=2, eos_token_id=2))


def gpt_oss() -> nn.Module:
    """GPT-OSS: transposed expert tensors with biases, attention sinks, alternating sliding-window layers."""
    from transformers import GptOssConfig, GptOssForCausalLM

    # YaRN stretching 32 original positions by 2 to the 64 of max_position_embeddings, as the real model stretches 4096.
    rope = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32, "rope_theta": 150000.0}
    config = GptOssConfig(**_CAUSAL, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                          layer_types=_HYBRID, rope_parameters=rope)
    return GptOssForCausalLM(config)


# Plain torch models.


class MHAClassifier(nn.Module):
    """Token embeddings, one nn.MultiheadAttention self-attention, mean pooling and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, LABELS)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        x, _ = self.attn(x, x, x, need_weights=False)
        return self.head(x.mean(dim=1))


class ConvNet(nn.Module):
    """A Conv2d over 8x8 images, its 4x4 maps read as 16-step signals by a Conv1d, then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(1, 4, kernel_size=3, stride=2, padding=1)
        self.conv1d = nn.Conv1d(4, 4, kernel_size=3, padding=1)
        self.head = nn.Linear(4 * 16, LABELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = torch.relu(self.conv2d(x))  # (batch, 4, 4, 4)
        signal = maps.flatten(2)  # (batch, 4 channels, 16 steps)
        features = torch.relu(self.conv1d(signal))
        return self.head(features.flatten(1))


class EmbeddingMLP(nn.Module):
    """Token embeddings, a Linear layer, mean pooling and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.fc = nn.Linear(16, 32)
        self.head = nn.Linear(32, LABELS)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(self.embed(input_ids))).mean(dim=1))


def _decoder(name: str, build: Callable[[], nn.Module]) -> Family:
    """A causal language model family fed token ids."""
    return Family(name, "decoder", build, _token_inputs, _logits, LM_HEAD, token_model=True)


def _encoder(name: str, build: Callable[[], nn.Module]) -> Family:
    """A sequence classifier family fed token ids."""
    return Family(name, "encoder", build, _token_inputs, _logits, CLASSIFIER, token_model=True)


def _moe(name: str, build: Callable[[], nn.Module]) -> Family:
    """A mixture-of-experts causal language model family fed token ids."""
    return Family(name, "moe", build, _token_inputs, _logits, LM_HEAD, token_model=True)


FAMILIES: list[Family] = [
    _decoder("llama", llama),
    _decoder("mistral", mistral),
    _decoder("qwen2", qwen2),
    _decoder("qwen3", qwen3),
    _decoder("gemma", gemma),
    _decoder("gemma2", gemma2),
    _decoder("phi3", phi3),
    _decoder("gpt2", gpt2),
    _decoder("gpt_neox", gpt_neox),
    _decoder("opt", opt),
    _decoder("bloom", bloom),
    _encoder("bert", bert),
    _encoder("roberta", roberta),
    _encoder("deberta_v2", deberta_v2),
    _encoder("distilbert", distilbert),
    Family("t5", "encoder-decoder", t5, _seq2seq_inputs, _logits, LM_HEAD, token_model=True),
    Family("bart", "encoder-decoder", bart, _seq2seq_inputs, _logits, LM_HEAD, token_model=True),
    Family("vit", "vision", vit, _image_inputs, _logits, CLASSIFIER, token_model=False),
    Family("clip", "dual-encoder", clip, _clip_inputs, _logits_per_image, frozenset(), token_model=False),
    Family("whisper", "speech", whisper, _whisper_inputs, _logits, frozenset({"proj_out"}), token_model=False),
    _moe("mixtral", mixtral),
    _moe("qwen3_moe", qwen3_moe),
    _moe("olmoe", olmoe),
    _moe("gpt_oss", gpt_oss),
    Family("mha", "torch", MHAClassifier, _token_inputs, _tensor, HEAD, token_model=False),
    Family("convnet", "torch", ConvNet, _conv_inputs, _tensor, HEAD, token_model=False,
           lora_targets=["conv2d", "conv1d"]),
    Family("embedding_mlp", "torch", EmbeddingMLP, _token_inputs, _tensor, HEAD, token_model=False,
           lora_targets=["embed", "fc"]),
]
