"""A CLIP tower cut at cache layer k: `head` runs blocks [0, k), `tail` [k, L) + norm + projection.

The features stage stores the head's output (the hidden state entering block k); stage 1 continues
from the cache with `VisionTail` / `TextTail`, whose blocks are deep copies of the CLIP blocks
and so can be fine-tuned. `cache_layer = "final"` is the frozen case: nothing is left to run
(`vision_final` / `text_final` give what the features stage stores then).

Layouts follow `transformers` 5.x `modeling_clip.py`: `model.vision_model.{embeddings, pre_layrnorm,
encoder.layers, post_layernorm}`, `model.text_model.{embeddings, encoder.layers, final_layer_norm}`,
`model.visual_projection`, `model.text_projection`. Encoder layers are called as
`layer(hidden, attention_mask)` where the mask is 4-D `[B, 1, L, L]`: boolean (True = attend) for
the SDPA kernel, additive float (0 or the dtype's minimum) for the eager kernel - the two formats
`transformers.masking_utils.create_causal_mask` produces. Text blocks see CLIP's causal mask AND the
key padding mask; vision blocks see no mask.
"""
from __future__ import annotations

import copy
from typing import Literal, Union

import torch
from torch import nn

CacheLayer = Union[int, Literal["final"]]

# Before transformers PR #24773 CLIP configs carried eos_token_id = 2 and pooled at
# argmax(input_ids) (the EOT token had the largest id); CLIPTextModel still does so for them.
_LEGACY_EOS_ID = 2


def tower_layers(model: nn.Module) -> tuple[int, int]:
    """Number of encoder blocks of the (vision, text) towers of a CLIPModel."""
    return len(model.vision_model.encoder.layers), len(model.text_model.encoder.layers)


def check_cache_layer(model: nn.Module, cache_layer: CacheLayer) -> None:
    """Raise ValueError unless cache_layer is "final" or an int in [0, L] for both towers."""
    if cache_layer == "final":
        return
    n_vision, n_text = tower_layers(model)
    if not isinstance(cache_layer, int) or isinstance(cache_layer, bool):
        raise ValueError(f"cache_layer must be an int or 'final', got {cache_layer!r}")
    if not 0 <= cache_layer <= min(n_vision, n_text):
        raise ValueError(
            f"cache_layer {cache_layer} is outside [0, {min(n_vision, n_text)}] "
            f"(vision tower has {n_vision} blocks, text tower {n_text})"
        )


def eos_index(input_ids: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """[M, L] token ids -> [M] index of the pooled (EOS) token, as CLIPTextModel picks it."""
    if eos_token_id is None or eos_token_id == _LEGACY_EOS_ID:
        return input_ids.to(torch.int).argmax(dim=-1).long()  # first maximum = first EOT
    return (input_ids == eos_token_id).int().argmax(dim=-1).long()  # first EOS


def attention_impl(layer: nn.Module) -> str:
    """The attention kernel name ("sdpa", "eager", ...) an encoder layer dispatches to."""
    return layer.self_attn.config._attn_implementation or "eager"


def text_attention_mask(mask: torch.Tensor, impl: str, dtype: torch.dtype) -> torch.Tensor:
    """[M, L] bool padding mask -> [M, 1, L, L] causal + key-padding mask in the kernel's format.

    Query i may attend key j iff j <= i and mask[:, j]. SDPA gets a boolean mask (True = attend);
    every other kernel (eager) an additive float mask: 0 where allowed, finfo(dtype).min elsewhere.
    Rows of padded queries stay valid because position 0 (BOS) is always a real token.
    """
    m, length = mask.shape
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()  # [L, L]
    allowed = causal[None, None] & mask.bool()[:, None, None, :]  # [M, 1, L, L]
    if impl == "sdpa":
        return allowed
    if impl not in ("eager",):
        raise ValueError(f"attention implementation {impl!r} is not supported (use sdpa/eager)")
    additive = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
    return additive.masked_fill(~allowed, torch.finfo(dtype).min)


def _run_layers(
    layers: nn.ModuleList | list[nn.Module], hidden: torch.Tensor, mask4d: torch.Tensor | None
) -> torch.Tensor:
    for layer in layers:
        hidden = layer(hidden, mask4d)
    return hidden


# ----------------------------------------------------------------------------------------------
# Heads: embeddings + the first k blocks (run once, by the features stage)
# ----------------------------------------------------------------------------------------------


def vision_head(model: nn.Module, pixel_values: torch.Tensor, k: int) -> torch.Tensor:
    """[B, 3, S, S] normalised pixels -> [B, T, H] hidden state entering vision block k.

    k = 0 is the encoder's input: patch + class embeddings + positions, then pre_layrnorm.
    """
    vm = model.vision_model
    hidden = vm.pre_layrnorm(vm.embeddings(pixel_values))
    return _run_layers(vm.encoder.layers[:k], hidden, None)


def text_head(
    model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, k: int
) -> torch.Tensor:
    """[M, L] ids + [M, L] padding mask -> [M, L, H] hidden state entering text block k."""
    tm = model.text_model
    hidden = tm.embeddings(input_ids=input_ids)
    layers = tm.encoder.layers[:k]
    if len(layers) == 0:
        return hidden
    mask4d = text_attention_mask(mask, attention_impl(layers[0]), hidden.dtype)
    return _run_layers(layers, hidden, mask4d)


def vision_final(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """[B, 3, S, S] -> [B, D] projected CLS embedding: the full tower, as CLIPModel computes it."""
    return model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)


def text_final(
    model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, eos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, L] ids, mask, [M] eos -> (tokens [M, L, D] after final norm + projection, [M, D]).

    The sentence vector equals CLIPModel.get_text_features (the projection is linear, so
    projecting every token and gathering at EOS is the same as gathering then projecting).
    """
    hidden = model.text_model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
    tokens = model.text_projection(hidden)
    return tokens, tokens[torch.arange(tokens.shape[0], device=tokens.device), eos]


# ----------------------------------------------------------------------------------------------
# Tails: blocks [k, L) + final norm + projection (trainable copies, used by stage 1)
# ----------------------------------------------------------------------------------------------


def _param_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class VisionTail(nn.Module):
    """Continue the vision tower from the hidden state entering block `start_layer`.

    Holds deep copies of vision blocks [start_layer, L), post_layernorm and visual_projection.
    """

    def __init__(self, clip_model: nn.Module, start_layer: int) -> None:
        super().__init__()
        check_cache_layer(clip_model, start_layer)
        vm = clip_model.vision_model
        self.start_layer = start_layer
        self.layers = nn.ModuleList(copy.deepcopy(list(vm.encoder.layers[start_layer:])))
        self.post_layernorm = copy.deepcopy(vm.post_layernorm)
        self.projection = copy.deepcopy(clip_model.visual_projection)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, T, H] cached hidden states (frames flattened into B) -> [B, D] frame embeddings."""
        hidden = _run_layers(self.layers, hidden.to(_param_dtype(self)), None)
        return self.projection(self.post_layernorm(hidden[:, 0]))  # CLS token


class TextTail(nn.Module):
    """Continue the text tower from the hidden state entering block `start_layer`.

    Holds deep copies of text blocks [start_layer, L), final_layer_norm and text_projection.
    """

    def __init__(self, clip_model: nn.Module, start_layer: int) -> None:
        super().__init__()
        check_cache_layer(clip_model, start_layer)
        tm = clip_model.text_model
        self.start_layer = start_layer
        self.layers = nn.ModuleList(copy.deepcopy(list(tm.encoder.layers[start_layer:])))
        self.final_layer_norm = copy.deepcopy(tm.final_layer_norm)
        self.projection = copy.deepcopy(clip_model.text_projection)
        self.impl = attention_impl(tm.encoder.layers[0]) if len(tm.encoder.layers) else "sdpa"

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor, eos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[M, L, H] cached hidden, [M, L] bool mask, [M] eos index
        -> (tokens [M, L, D] after final norm + projection, sentence [M, D] = tokens at EOS)."""
        hidden = hidden.to(_param_dtype(self))
        if len(self.layers):
            mask4d = text_attention_mask(mask, attention_impl(self.layers[0]), hidden.dtype)
            hidden = _run_layers(self.layers, hidden, mask4d)
        tokens = self.projection(self.final_layer_norm(hidden))
        idx = torch.arange(tokens.shape[0], device=tokens.device)
        return tokens, tokens[idx, eos.to(tokens.device).long()]
