"""Hugging Face ``transformers`` integration: ``attn_implementation="moba"``.

    import moba_cute.integrations.transformers  # registers "moba"
    cfg = AutoConfig.for_model("llama", ..., moba_chunk_size=4096, moba_topk=12)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="moba")

Every attention layer of a model that calls transformers' attention interface (Llama, Qwen2/3,
Mistral, ...) then runs :func:`moba_cute.varlen_attention` (CuTe kernels on the GPU, the
PyTorch reference elsewhere; ``backend="auto"``). Model config keys:

* ``moba_chunk_size`` (default 4096) and ``moba_topk`` (default 12): an int, or a list with one
  entry per layer (``None`` in the list: that layer is dense);
* ``moba_dense_last_layers`` (default 0): the last N layers attend densely (causal), as the MoBA
  paper trains its last layers.

Inputs handled: plain batches; padded batches with a 2-D ``attention_mask`` (left or right
padding: the valid tokens are packed, no padded token is computed); packed batches, either
with flash-attention's ``cu_seq_lens_q/k`` keyword arguments or with ``position_ids`` that
restart at 0 (batch 1, no mask); decode steps against a KV cache (the ``Sq`` new queries are
the last ``Sq`` positions of the keys: SPEC's bottom-right alignment, so a step computes what
the full forward computes for those positions). GQA is passed through (no K/V repeat). Plain
batches go to the padded :func:`moba_cute.attention` as ``(B, S, heads, D)`` views of
transformers' ``(B, heads, S, D)`` tensors: a decode step (few queries, no gradient) runs the
decode kernels on the KV cache in place, without a copy. A
dense layer is MoBA with one chunk covering the whole sequence and ``topk = 1``. Attention
dropout is not supported (a clear error when training with it).

Generation: :class:`MobaCache` (a ``DynamicCache``) also keeps each MoBA layer's chunk centroids
(:func:`moba_cute.key_centroids`), extended as chunks fill up, so that a decode step's routing
reads them instead of all of K (plain batches; padded and packed calls compute them from K)::

    out = model.generate(ids, past_key_values=MobaCache(model.config), ...)
"""

from __future__ import annotations

import weakref

import torch

from .. import interface

from transformers.cache_utils import DynamicCache

NAME = "moba"
DEFAULT_CHUNK_SIZE = 4096
DEFAULT_TOPK = 12

__all__ = ["NAME", "register", "moba_attention_forward", "layer_settings", "MobaCache", "DEFAULT_CHUNK_SIZE",
           "DEFAULT_TOPK"]


def layer_settings(config, layer_idx: int):
    """``(chunk_size, topk)`` of layer ``layer_idx`` from the model config, or None (dense)."""
    n = int(getattr(config, "num_hidden_layers", 0) or 0)
    dense_last = int(getattr(config, "moba_dense_last_layers", 0) or 0)
    if dense_last < 0:
        raise ValueError(f"moba_dense_last_layers must be >= 0, got {dense_last}")
    if n and layer_idx >= n - dense_last:
        return None

    def pick(name, default):
        val = getattr(config, name, None)
        if val is None:
            return default
        if isinstance(val, (list, tuple)):
            if len(val) != n:
                raise ValueError(f"{name} has {len(val)} entries; the model has {n} layers")
            val = val[layer_idx]
            if val is None:
                return None
        return int(val)

    chunk, topk = pick("moba_chunk_size", DEFAULT_CHUNK_SIZE), pick("moba_topk", DEFAULT_TOPK)
    if chunk is None or topk is None:
        return None
    return chunk, topk


def _chunk_topk(settings, max_k):
    """(chunk_size, topk) of a layer; ``settings`` None: dense causal (one chunk over the longest
    sequence)."""
    if settings is None:
        return max(16, -(-max(max_k, 1) // 16) * 16), 1
    return settings


def _attend(q, k, v, cu_q, cu_k, max_q, max_k, settings, scaling):
    """varlen MoBA (see :func:`_chunk_topk`)."""
    chunk, topk = _chunk_topk(settings, max_k)
    return interface.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, chunk, topk, causal=True,
                                      softmax_scale=scaling)


def _cu(lens: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)


_MEMO = [None, None]  # (key, layout) of the last padding mask / position_ids seen


def _once_per_forward(what, t, Sq, Sk, build):
    """The varlen layout derived from ``t`` (the padding mask or the position_ids: the same
    tensor object in every layer of one forward), built once per forward instead of once per
    layer (it needs host synchronizations). Keyed by the tensor object and its version.
    Inference tensors (made under ``torch.inference_mode``) have no version counter, so an
    in-place change between two forwards could not be seen: their layout is built every time."""
    if t.is_inference():
        return build()
    key = _MEMO[0]
    if key is not None and key[0] == what and key[1] is t and key[2:] == (t._version, Sq, Sk):
        return _MEMO[1]
    val = build()
    _MEMO[0], _MEMO[1] = (what, t, t._version, Sq, Sk), val
    return val


def _packed_from_positions(position_ids, S):
    """(cu_seqlens, longest) of a batch-1 row whose ``position_ids`` restart (packed
    sequences), else None."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1 or position_ids.shape[1] != S:
        return None

    def build():
        pos = position_ids[0]
        restarts = torch.nonzero(torch.diff(pos) != 1).flatten() + 1
        if restarts.numel() == 0:
            return None
        starts = torch.cat([torch.zeros(1, dtype=restarts.dtype, device=pos.device), restarts])
        ends = torch.cat([starts[1:], torch.tensor([S], device=pos.device)])
        return _cu(ends - starts), int((ends - starts).max())

    return _once_per_forward("packed", position_ids, S, S, build)


def _unpadding(attention_mask, Sq, Sk):
    """(keep_q, keep_k, cu_q, cu_k, max_q, max_k) of a padded batch, or None (no padding)."""

    def build():
        keep_k = attention_mask.bool()
        if bool(keep_k.all()):
            return None
        keep_q = keep_k[:, Sk - Sq:]
        lens_q, lens_k = keep_q.sum(1), keep_k.sum(1)
        return keep_q, keep_k, _cu(lens_q), _cu(lens_k), int(lens_q.max()), int(lens_k.max())

    return _once_per_forward("padded", attention_mask, Sq, Sk, build)


def moba_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: ``query`` (B, H, Sq, D), ``key``/``value`` (B, Hk, Sk, D)
    (after the cache update) -> ``(out (B, Sq, H, D), None)``."""
    if dropout and getattr(module, "training", False):
        raise ValueError(f"attn_implementation='moba' does not support attention dropout (got dropout={dropout})")
    settings = layer_settings(module.config, int(getattr(module, "layer_idx", 0) or 0))
    B, H, Sq, D = query.shape
    Hk, Sk = key.shape[1], key.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, S, heads, D)
    scale = None if scaling is None else float(scaling)

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:  # packed, flash-attention style (B == 1)
        cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
        max_q = int(kwargs.get("max_length_q") or int((cu_q[1:] - cu_q[:-1]).max()))
        max_k = int(kwargs.get("max_length_k") or int((cu_k[1:] - cu_k[:-1]).max()))
        out = _attend(q.reshape(B * Sq, H, D), k.reshape(B * Sk, Hk, D), v.reshape(B * Sk, Hk, D), cu_q, cu_k,
                      max_q, max_k, settings, scale)
        return out.view(B, Sq, H, D), None

    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape != (B, Sk):
            raise ValueError(
                f"attn_implementation='moba' takes a 2-D padding mask of shape (batch, keys) = ({B}, {Sk}); "
                f"got shape {tuple(attention_mask.shape)}")
        unpad = _unpadding(attention_mask, Sq, Sk)
        if unpad is not None:  # padded batch: pack the valid tokens
            keep_q, keep_k, cu_q, cu_k, max_q, max_k = unpad
            out_v = _attend(q[keep_q], k[keep_k], v[keep_k], cu_q, cu_k, max_q, max_k, settings, scale)
            out = query.new_zeros(B, Sq, H, D)
            out[keep_q] = out_v
            return out, None

    if Sq == Sk:
        packed = _packed_from_positions(kwargs.get("position_ids"), Sq) if B == 1 else None
        if packed is not None:  # packed by restarting position_ids
            cu, max_len = packed
            out = _attend(q.reshape(Sq, H, D), k.reshape(Sk, Hk, D), v.reshape(Sk, Hk, D), cu, cu, max_len, max_len,
                          settings, scale)
            return out.view(B, Sq, H, D), None

    # a plain batch: the padded API on the (B, S, heads, D) views of transformers' tensors (the
    # decode kernels read those strides in place; the general path packs them), with the chunk
    # centroids a MobaCache attached to the keys it returned
    chunk, topk = _chunk_topk(settings, Sk)
    cached = getattr(key, _CENT_ATTR, None)
    cent = cached[1] if cached is not None and settings is not None and cached[0] == chunk else None
    out = interface.attention(q, k, v, chunk, topk, causal=True, softmax_scale=scale, key_centroids=cent)
    return out, None


_CENT_ATTR = "_moba_centroids"  # (chunk size, centroids) on the keys tensor a MobaCache returns


class MobaCache(DynamicCache):
    """transformers' ``DynamicCache`` that also keeps the chunk centroids of every MoBA layer
    (``model.config``'s chunk sizes, :func:`layer_settings`): computed for the prompt, extended
    when the cache grows past a chunk boundary (one chunk's mean per ``chunk_size`` tokens), and
    attached to the keys tensor :meth:`update` returns, where the attention function finds them.
    A decode step then reads ``Sk / chunk_size`` centroids instead of all of K for its routing.

    The centroids follow the keys: an update continues them only when the layer's keys are the
    tensor this cache returned last (``DynamicCache`` replaces the tensor on every change:
    ``reorder_cache`` for beam search, ``crop``, batch selection); otherwise they are computed
    again from all of the keys."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._moba_config = config
        self._moba_cent: dict = {}  # layer -> (weakref to the keys returned, centroids, full chunks cached)

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        prev = None
        if layer_idx < len(self.layers) and getattr(self.layers[layer_idx], "is_initialized", False):
            prev = self.layers[layer_idx].keys
        keys, values = super().update(key_states, value_states, layer_idx, cache_kwargs)
        settings = layer_settings(self._moba_config, layer_idx)
        if settings is None or keys.dim() != 4:
            return keys, values
        C = settings[0]
        B, Hk, S, D = keys.shape
        ent = self._moba_cent.get(layer_idx)
        if ent is None or prev is None or ent[0]() is not prev or ent[1].shape[0] != B or ent[1].shape[2:] != (Hk, D):
            ent = (None, keys.new_zeros((B, max(S // C, 1), Hk, D), dtype=torch.float32), 0)
        _, cent, done = ent
        need = S // C
        if need > cent.shape[1]:  # grow (doubling: a copy every few chunks at most)
            bigger = cent.new_zeros((B, max(need, 2 * cent.shape[1]), Hk, D))
            bigger[:, :done] = cent[:, :done]
            cent = bigger
        if need > done:
            interface.key_centroids(keys.transpose(1, 2), C, out=cent, start_chunk=done)
            done = need
        self._moba_cent[layer_idx] = (weakref.ref(keys), cent, done)
        setattr(keys, _CENT_ATTR, (C, cent))
        return keys, values


def register() -> None:
    """Register ``"moba"`` with transformers' attention interface, and its mask builder: the
    2-D padding mask (None when nothing is padded), as for flash-attention (done on import)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, moba_attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)


register()
