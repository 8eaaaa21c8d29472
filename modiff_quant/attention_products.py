"""The operands of attention's activation products (QKᵀ and softmax·V) as modules a recipe can
match.

diffusers' attention runs both products inside one fused call (`scaled_dot_product_attention`)
or inside its processor, where no module boundary marks what enters them. `prepare` gives each
attention module whose operands a recipe quantizes four `AttentionOperand` children (`attn_q`,
`attn_k`, `attn_probs`, `attn_v`) and a processor that sends the operands through them before
multiplying, so each operand is quantized (and modulated) like the input of a Linear layer.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

OPERANDS: tuple[str, ...] = ("attn_q", "attn_k", "attn_probs", "attn_v")
"""Child names of an attention module's operands: those of QKᵀ, then those of softmax·V."""

PRODUCTS: dict[str, tuple[str, str]] = {"qk": ("attn_q", "attn_k"), "pv": ("attn_probs", "attn_v")}
"""Each product and its two operands."""


class AttentionOperand(nn.Module):
    """An operand of an attention product; passes its input through unchanged until `prepare`
    re-classes it into a quantized operand."""

    def forward(self, x: Tensor) -> Tensor:
        return x


def is_attention(module: nn.Module) -> bool:
    """True for a diffusers `Attention` module (the processor-based attention of its UNets)."""
    return all(hasattr(module, attr) for attr in ("set_processor", "to_q", "to_k", "to_v", "to_out", "heads"))


def attention_operands(model: nn.Module) -> dict[str, str]:
    """Name of every operand the model's attention modules have or would get → the attention
    module's name."""
    return {
        f"{name}.{operand}": name
        for name, module in model.named_modules()
        if name and is_attention(module)
        for operand in OPERANDS
    }


def install_operands(attention: nn.Module) -> None:
    """Give `attention` its operand children (kept where present) and the processor that
    computes through them."""
    for operand in OPERANDS:
        if not isinstance(getattr(attention, operand, None), AttentionOperand):
            attention.add_module(operand, AttentionOperand())
    attention.set_processor(OperandAttnProcessor())


class OperandAttnProcessor:
    """diffusers attention processor with explicit products whose operands pass through the
    attention module's `AttentionOperand` children.

    Operands keep one axis per sample and per head, (batch, heads, tokens, channels), so that
    `sample` granularity gives each sample its own scales, as for the model's layers."""

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.dim() == 4 else None
        if image_shape is not None:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)  # (batch, pixels, channels)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states
        if encoder_hidden_states is not None:
            context = (
                attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
            )
        batch, tokens = hidden_states.shape[:2]
        query, key, value = (
            _heads(t, attn.heads) for t in (attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context))
        )
        if attn.upcast_attention:
            query, key = query.float(), key.float()
        scores = (attn.attn_q(query) @ attn.attn_k(key).transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            scores = scores + mask.view(batch, attn.heads, -1, mask.shape[-1])
        probs = (scores.float() if attn.upcast_softmax else scores).softmax(dim=-1).to(value.dtype)
        mixed = attn.attn_probs(probs) @ attn.attn_v(value)
        hidden_states = attn.to_out[1](attn.to_out[0](mixed.transpose(1, 2).reshape(batch, tokens, -1)))
        if image_shape is not None:
            hidden_states = hidden_states.transpose(1, 2).reshape(image_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _heads(x: Tensor, heads: int) -> Tensor:
    """(batch, tokens, heads × channels) → (batch, heads, tokens, channels)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)
