"""Qwen2.5-VL on megatron-core: a ViT built from megatron transformer layers, the 2x2 patch merger, and the
Qwen2 decoder as a megatron ``GPTModel`` with 3D M-RoPE.

Forward contract (``Qwen25VLModel.forward``): every tensor describes the FULL sequence — token ids
``[b, s]``, 3D positions ``[3, b, s]``, segment ids ``[b, s]`` (or None), labels ``[b, s]`` — on every
pipeline stage. The model scatters image embeddings into ``<|image_pad|>`` slots, then keeps this
context-parallel rank's load-balanced chunks (``parallel.context_parallel``) and, with sequence
parallelism, this TP rank's slice. The output (logits ``[b, s/cp, V/tp]`` or per-token loss ``[b, s/cp]``)
covers the local chunks: split loss masks with ``split_for_context_parallel`` to match.

``head_mask`` ``[b, s]`` (bool, full sequence like the rest) runs the output head only where it is True: the
output is then ``[1, n]`` (per-token loss, or values) or ``[1, n, V/tp]`` (logits) for this rank's ``n``
selected positions, in the order of ``local_mask.nonzero()`` over the local ``[b, s/cp]`` mask (scatter back
with ``dense[local_mask] = output[0]``). PPO needs log-probabilities at response tokens only; the LM head and
its softmax over the vocabulary are the model's largest per-token cost on small models and its largest
activation on long sequences.

``head="value"`` builds the PPO critic: the same trunk with a scalar value head in place of the LM output
layer; its output is per-token values ``[b, s/cp]``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ovr import platform
from megatron_ovr.config import ParallelConfig, Qwen25VLConfig, VisionConfig
from megatron_ovr.parallel.context_parallel import split_for_context_parallel

from . import specs
from .positions import vision_patch_positions, vision_window_layout


def _common_transformer_kwargs(parallel: ParallelConfig, dtype: torch.dtype) -> dict:
    # Fusions are CUDA kernels (or need apex); the unfused paths are numerically the reference.
    on_gpu = platform.HAVE_CUDA
    return dict(
        tensor_model_parallel_size=parallel.tensor_parallel,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        use_cpu_initialization=not on_gpu,
        attention_softmax_in_fp32=True,
    )


def vision_transformer_config(vision: VisionConfig, parallel: ParallelConfig, dtype: torch.dtype) -> TransformerConfig:
    """The ViT is neither pipelined, context-parallel nor sequence-parallel: it is small next to the LM,
    runs on the first pipeline stage, and each CP rank encodes all images of its micro-batch."""
    return TransformerConfig(
        num_layers=vision.depth,
        hidden_size=vision.hidden_size,
        num_attention_heads=vision.num_heads,
        num_query_groups=vision.num_heads,
        kv_channels=vision.head_dim,
        ffn_hidden_size=vision.intermediate_size,
        layernorm_epsilon=vision.rms_norm_eps,
        add_bias_linear=True,
        add_qkv_bias=True,
        **_common_transformer_kwargs(parallel, dtype),
    )


def merger_transformer_config(cfg: Qwen25VLConfig, parallel: ParallelConfig, dtype: torch.dtype) -> TransformerConfig:
    """Merger MLP: (hidden * merge_unit) -> same -> GELU (exact) -> LM hidden, with biases."""
    width = cfg.vision.hidden_size * cfg.vision.merge_unit
    kwargs = _common_transformer_kwargs(parallel, dtype)
    kwargs.update(gated_linear_unit=False, activation_func=F.gelu, bias_activation_fusion=False)
    return TransformerConfig(
        num_layers=1,
        hidden_size=cfg.text.hidden_size,
        num_attention_heads=parallel.tensor_parallel,  # unused by an MLP; megatron checks it divides by TP
        ffn_hidden_size=width,
        add_bias_linear=True,
        **kwargs,
    )


def language_transformer_config(
    cfg: Qwen25VLConfig,
    parallel: ParallelConfig,
    dtype: torch.dtype,
    fp8: Optional[str] = None,
    recompute: bool = False,
) -> TransformerConfig:
    """``fp8`` ("e4m3" or "hybrid") runs the decoder's GEMMs in FP8 through Transformer Engine;
    ``recompute`` recomputes every decoder layer's activations in backward instead of storing them."""
    text = cfg.text
    recompute_kwargs = (
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) if recompute else {}
    )
    return TransformerConfig(
        num_layers=text.num_layers,
        hidden_size=text.hidden_size,
        num_attention_heads=text.num_attention_heads,
        num_query_groups=text.num_key_value_heads,
        kv_channels=text.head_dim,
        ffn_hidden_size=text.intermediate_size,
        layernorm_epsilon=text.rms_norm_eps,
        add_bias_linear=False,
        add_qkv_bias=True,
        mrope_section=list(text.mrope_section),
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        context_parallel_size=parallel.context_parallel,
        sequence_parallel=parallel.sequence_parallel,
        pipeline_dtype=dtype,
        # gloo pairs batched sends/receives by posting order, which the interleaved schedule breaks when
        # the previous and next stage are the same rank (PP=2): unbatched p2p is exact there.
        batch_p2p_comm=platform.HAVE_CUDA,
        fp8=fp8,
        **recompute_kwargs,
        **_common_transformer_kwargs(parallel, dtype),
    )


class VisionRotaryEmbedding(torch.nn.Module):
    """2D RoPE of the ViT: half of each head's rotary angles follow the patch row, half the column."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        spatial_dim = head_dim // 2
        inv_freq = 1.0 / (theta ** (torch.arange(0, spatial_dim, 2, dtype=torch.float32) / spatial_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, patch_positions: torch.Tensor) -> torch.Tensor:
        """patch_positions [n, 2] (row, col) -> angles [n, 1, 1, head_dim] in megatron's rotary layout."""
        angles = patch_positions.to(self.inv_freq.dtype)[..., None] * self.inv_freq  # [n, 2, head_dim/4]
        angles = angles.flatten(1)  # [n, head_dim/2]: row angles, then column angles
        return torch.cat([angles, angles], dim=-1)[:, None, None, :]


class Qwen25VisionModel(MegatronModule):
    """Patch embedding -> window-ordered ViT blocks (2D RoPE) -> 2x2 merger -> original token order."""

    def __init__(self, cfg: Qwen25VLConfig, parallel: ParallelConfig, dtype: torch.dtype, backend: str):
        vision_config = vision_transformer_config(cfg.vision, parallel, dtype)
        super().__init__(config=vision_config)
        self.vision = cfg.vision
        # A Conv3d whose stride equals its kernel is a linear map of each flattened patch.
        self.patch_embed = torch.nn.Linear(cfg.vision.patch_dim, cfg.vision.hidden_size, bias=False, dtype=dtype)
        self.rotary = VisionRotaryEmbedding(cfg.vision.head_dim, cfg.vision.rope_theta)
        self.decoder = TransformerBlock(
            config=vision_config,
            spec=specs.vision_block_spec(backend, cfg.vision.depth, cfg.vision.fullatt_block_indexes),
            pre_process=True,
            post_process=False,
            post_layer_norm=False,
        )
        self.merger_norm = specs.RMSNorm(vision_config, cfg.vision.hidden_size, eps=cfg.vision.rms_norm_eps)
        self.merger = MultimodalProjector(
            config=merger_transformer_config(cfg, parallel, dtype),
            submodules=specs.merger_mlp_spec(),
            projector_type="mlp",
            input_size=cfg.vision.hidden_size * cfg.vision.merge_unit,
        )

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values [num_patches, patch_dim] (HF processor layout), image_grid_thw [num_images, 3]
        -> image embeddings [num_patches / merge_unit, lm_hidden] in the images' token order."""
        v = self.vision
        expected = int(image_grid_thw.prod(dim=-1).sum())
        if pixel_values.shape != (expected, v.patch_dim):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)} but image_grid_thw "
                f"{image_grid_thw.tolist()} needs ({expected}, {v.patch_dim})"
            )
        layout = vision_window_layout(image_grid_thw, v.spatial_merge_size, v.window_size, v.patch_size)
        num_patches, unit = pixel_values.shape[0], v.merge_unit

        def window_order(x: torch.Tensor) -> torch.Tensor:
            # Windows group whole merge blocks, so permute blocks of merge_unit consecutive patches.
            return x.reshape(num_patches // unit, unit, -1)[layout.window_index].reshape(num_patches, -1)

        hidden = window_order(self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)))
        positions = window_order(vision_patch_positions(image_grid_thw, v.spatial_merge_size))
        rotary = self.rotary(positions.to(hidden.device))
        segments = torch.stack([layout.image_segment_ids, layout.window_segment_ids])[:, None, :].to(hidden.device)
        hidden = self.decoder(hidden_states=hidden[:, None, :], attention_mask=segments, rotary_pos_emb=rotary)
        merged = self.merger_norm(hidden[:, 0, :]).reshape(num_patches // unit, unit * v.hidden_size)
        return self.merger(merged)[layout.reverse_index.to(hidden.device)]


class ValueHead(torch.nn.Module):
    """The critic's head, in the place of GPTModel's output layer (so megatron's post-processing, pipeline
    bookkeeping and checkpoint keys stay those of the LM): hidden ``[s, b, h]`` -> values ``[s, b, 1]``.
    One ``[1, h]`` weight, no bias, replicated over TP; with sequence parallelism the hidden states are
    gathered first (what the output layer would have done). Every TP rank then computes the same values and
    the same loss, so the gradient of each rank's sequence slice is its slice of the full one: the gather's
    backward splits (a reduce-scatter, right for the vocab-parallel LM head, would count it tp times)."""

    def __init__(self, config: TransformerConfig, dtype: torch.dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(1, config.hidden_size, dtype=dtype))
        self.sequence_parallel = config.sequence_parallel

    def forward(self, hidden: torch.Tensor, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return F.linear(hidden, self.weight), None


def init_value_head(chunks, seed: int) -> None:
    """ORZ's head init: ``nn.Linear``'s default, kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(h), 1/sqrt(h)).
    Seeded on its own so every TP rank (and a resumed run) draws the same head."""
    for chunk in chunks:
        head = getattr(chunk.language_model, "output_layer", None)
        if not isinstance(head, ValueHead):
            continue
        bound = 1.0 / head.weight.shape[1] ** 0.5
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            head.weight.copy_(torch.rand(head.weight.shape, generator=generator) * 2 * bound - bound)


def scatter_image_embeddings(
    text_embeddings: torch.Tensor, input_ids: torch.Tensor, image_embeddings: torch.Tensor, image_token_id: int
) -> torch.Tensor:
    """Puts image embeddings [n, h] into the ``image_token_id`` slots of text embeddings [s, b, h],
    in (row, position) order."""
    slots = input_ids == image_token_id
    num_slots = int(slots.sum())
    if num_slots != image_embeddings.shape[0]:
        raise ValueError(
            f"the batch has {num_slots} <|image_pad|> tokens (id {image_token_id}) but the images give "
            f"{image_embeddings.shape[0]} embeddings (image_grid_thw / merge_unit): they must match"
        )
    batch_first = text_embeddings.transpose(0, 1)
    filled = batch_first.masked_scatter(slots[..., None], image_embeddings.to(batch_first.dtype))
    # Contiguous in [s, b, h]: layers keep their input's strides, and pipeline sends need contiguous tensors.
    return filled.transpose(0, 1).contiguous()


class LanguageModel(GPTModel):
    """megatron's ``GPTModel`` whose output head can run at selected positions only (``head_at``).

    The selection sits between the decoder (whose output is already final-normed) and megatron's own
    post-processing, so the head, the loss and weight tying stay megatron's. With sequence parallelism the
    hidden states are gathered here and the head runs without its own gather, as megatron-core's dynamic
    inference does for last-token logits."""

    _head_rows: Optional[torch.Tensor] = None

    @contextmanager
    def head_at(self, rows: Optional[torch.Tensor]) -> Iterator[None]:
        """Within the block, forward passes run the head only where ``rows`` (``[b, s_local]`` bool) is True."""
        self._head_rows = rows
        try:
            yield
        finally:
            self._head_rows = None

    def _postprocess(self, hidden_states, **kwargs):
        rows = self._head_rows
        if rows is None or not self.post_process:
            return super()._postprocess(hidden_states=hidden_states, **kwargs)
        head = self.output_layer
        sequence_parallel = head.sequence_parallel
        if sequence_parallel:
            # Backward splits the gradient: the head's input gradient is already summed over TP (the LM head's
            # own all-reduce) or identical on every TP rank (the replicated value head).
            hidden_states = tensor_parallel.gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False
            )
        hidden_states = hidden_states.transpose(0, 1)[rows.to(hidden_states.device)][:, None]  # [n, 1, h]
        head.sequence_parallel = False
        try:
            return super()._postprocess(hidden_states=hidden_states, **kwargs)
        finally:
            head.sequence_parallel = sequence_parallel


class Qwen25VLModel(MegatronModule):
    """One pipeline stage (or virtual-pipeline chunk) of Qwen2.5-VL. See the module docstring for the
    forward contract."""

    def __init__(
        self,
        cfg: Qwen25VLConfig,
        parallel: ParallelConfig,
        *,
        dtype: torch.dtype = torch.float32,
        backend: Optional[str] = None,
        fp8: Optional[str] = None,
        recompute: bool = False,
        head: str = "lm",
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: Optional[int] = None,
    ):
        cfg.validate_parallel(parallel.tensor_parallel)
        if head not in ("lm", "value"):
            raise ValueError(f"head={head!r}: choose 'lm' (the policy) or 'value' (the PPO critic)")
        backend = specs.resolve_backend(backend)
        if fp8 is not None and backend != "te":
            raise ValueError(f"fp8={fp8!r} needs the Transformer Engine layer spec (backend 'te'), not {backend!r}")
        lm_config = language_transformer_config(cfg, parallel, dtype, fp8, recompute)
        super().__init__(config=lm_config)
        self.cfg = cfg
        self.parallel = parallel
        self.backend = backend
        self.head = head
        self.pre_process = pre_process
        self.post_process = post_process
        self.vision = Qwen25VisionModel(cfg, parallel, dtype, self.backend) if pre_process else None
        self.language_model = LanguageModel(
            config=lm_config,
            transformer_layer_spec=specs.language_block_spec(self.backend, lm_config, vp_stage),
            vocab_size=cfg.text.vocab_size,
            max_sequence_length=cfg.text.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            # The critic has no output embedding to tie.
            share_embeddings_and_output_weights=cfg.text.tie_word_embeddings and head == "lm",
            position_embedding_type="mrope",
            rotary_base=cfg.text.rope_theta,
            # Image embeddings are scattered into the full sequence first; we split for CP/SP after.
            scatter_embedding_sequence_parallel=False,
            vp_stage=vp_stage,
        )
        if head == "value" and post_process:
            self.language_model.output_layer = ValueHead(lm_config, dtype)
        # megatron's schedules, DDP and finalize_model_grads look for these on the outermost module.
        self.model_type = self.language_model.model_type
        self.share_embeddings_and_output_weights = self.language_model.share_embeddings_and_output_weights

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        head_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        cp_size = self.config.context_parallel_size
        cp_rank = parallel_state.get_context_parallel_rank() if cp_size > 1 else 0
        decoder_input = None
        if self.pre_process:
            embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
            if pixel_values is not None:
                image_embeddings = self.vision(pixel_values, image_grid_thw)
                embeddings = scatter_image_embeddings(embeddings, input_ids, image_embeddings, self.cfg.image_token_id)
            elif bool((input_ids == self.cfg.image_token_id).any()):
                raise ValueError("the batch has <|image_pad|> tokens but no pixel_values were given")
            embeddings = split_for_context_parallel(embeddings, 0, cp_rank, cp_size)
            if self.config.sequence_parallel:
                embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
            decoder_input = embeddings
        if labels is not None:
            if self.head == "value":
                raise ValueError("the value model takes no labels: it returns per-token values")
            labels = split_for_context_parallel(labels, 1, cp_rank, cp_size)
        if head_mask is not None:
            head_mask = split_for_context_parallel(head_mask.bool(), 1, cp_rank, cp_size)
            if labels is not None:
                labels = labels[head_mask][None]
        with self.language_model.head_at(head_mask):
            output = self.language_model(
                input_ids=None,
                position_ids=position_ids,
                attention_mask=attention_mask,
                decoder_input=decoder_input,
                labels=labels,
            )
        if self.head == "value" and self.post_process:
            return output.squeeze(-1)  # [b, s/cp, 1] -> [b, s/cp]
        return output


def build_model_chunks(
    cfg: Qwen25VLConfig,
    parallel: ParallelConfig,
    *,
    dtype: torch.dtype = torch.float32,
    backend: Optional[str] = None,
    fp8: Optional[str] = None,
    recompute: bool = False,
    head: str = "lm",
) -> list[Qwen25VLModel]:
    """This rank's model chunks (one, or ``virtual_pipeline`` of them), after ``parallel_state`` is set up.
    ``head``: "lm" (the policy) or "value" (the critic)."""
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    if cfg.text.num_layers % (pp_size * (parallel.virtual_pipeline or 1)) != 0:
        raise ValueError(
            f"text.num_layers={cfg.text.num_layers} must be divisible by pipeline_parallel x virtual_pipeline "
            f"= {pp_size * (parallel.virtual_pipeline or 1)}"
        )
    chunks = []
    for vp_stage in range(parallel.virtual_pipeline or 1):
        vp = vp_stage if parallel.virtual_pipeline else None
        first = pp_rank == 0 and vp_stage == 0
        last = pp_rank == pp_size - 1 and vp_stage == (parallel.virtual_pipeline or 1) - 1
        chunks.append(
            Qwen25VLModel(
                cfg, parallel, dtype=dtype, backend=backend, fp8=fp8, recompute=recompute, head=head,
                pre_process=first, post_process=last, vp_stage=vp,
            )
        )
    return chunks
