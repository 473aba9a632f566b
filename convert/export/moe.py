"""Mixtures of experts: llama.cpp's stacked expert tensors from a checkpoint's per-expert or fused ones.

`MixtureOfExperts` is the `ArchModel` base of such families (Qwen3 MoE, Mixtral).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import ClassVar

import gguf

from alpaca_chat.errors import ConversionError
from convert.export.base import ArchModel, CombinedTensor


# An expert's projection, as checkpoints name it -> llama.cpp's stacked tensor of all experts.
EXPERT_PROJECTIONS: dict[str, gguf.MODEL_TENSOR] = {
    "gate_proj": gguf.MODEL_TENSOR.FFN_GATE_EXP,
    "up_proj": gguf.MODEL_TENSOR.FFN_UP_EXP,
    "down_proj": gguf.MODEL_TENSOR.FFN_DOWN_EXP,
    "w1": gguf.MODEL_TENSOR.FFN_GATE_EXP,  # Mixtral
    "w3": gguf.MODEL_TENSOR.FFN_UP_EXP,
    "w2": gguf.MODEL_TENSOR.FFN_DOWN_EXP,
}
# A mixture's tensors in llama.cpp (router, stacked experts), and a dense MLP's.
ROUTED = (gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_GATE_EXP, gguf.MODEL_TENSOR.FFN_UP_EXP,
          gguf.MODEL_TENSOR.FFN_DOWN_EXP)
DENSE = (gguf.MODEL_TENSOR.FFN_GATE, gguf.MODEL_TENSOR.FFN_UP, gguf.MODEL_TENSOR.FFN_DOWN)
_MOE_BLOCK = r"(?:^|\.)layers\.(?P<bid>\d+)\.(?:mlp|block_sparse_moe)"
_ONE_EXPERT = re.compile(_MOE_BLOCK + r"\.experts\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")
_FUSED_EXPERTS = re.compile(_MOE_BLOCK + r"\.experts\.(?P<proj>gate_up_proj|down_proj)(?:\.weight)?$")
_ROUTER = re.compile(_MOE_BLOCK + r"\.gate\.weight$")


class MixtureOfExperts(ArchModel):
    """A family whose feed-forward blocks are mixtures of experts (Qwen3 MoE, Mixtral).

    llama.cpp keeps a layer's experts as three 3-D tensors, [expert, rows, columns]:
    ffn_gate_exps, ffn_up_exps and ffn_down_exps, beside the router ffn_gate_inp.
    Checkpoints on the hub (and transformers 5's save_pretrained) store one matrix per
    expert (`experts.{i}.gate_proj`, Mixtral's `experts.{i}.w1`): they are stacked, one
    layer's projection at a time. Fused 3-D tensors (`experts.gate_up_proj`, gate rows
    then up rows, and `experts.down_proj`), as transformers 5 holds them in memory, are
    split or taken whole. The expert count in config.json must match the tensors.
    """

    _EXPERT_COUNT_KEYS: ClassVar[tuple[str, ...]] = ("num_local_experts", "num_experts", "n_routed_experts")
    _EXPERT_USED_KEYS: ClassVar[tuple[str, ...]] = ("num_experts_per_tok", "num_experts_per_token", "top_k_experts")

    @property
    def expert_count(self) -> tuple[str, int]:
        """config.json's key for the number of experts, and its value."""
        for key in self._EXPERT_COUNT_KEYS:
            if self.hparams.get(key) is not None:
                return key, int(self.hparams[key])
        raise ConversionError(f"config.json has none of {', '.join(self._EXPERT_COUNT_KEYS)}")

    def set_parameters(self, writer: gguf.GGUFWriter) -> None:
        super().set_parameters(writer)
        writer.add_expert_count(self.expert_count[1])
        writer.add_expert_used_count(int(self._param(*self._EXPERT_USED_KEYS)))

    def combined_tensors(self) -> list[CombinedTensor]:
        key, n_expert = self.expert_count
        combined = super().combined_tensors()
        per_expert: dict[tuple[int, gguf.MODEL_TENSOR], dict[int, str]] = {}
        routers: list[tuple[str, str]] = []
        for name in sorted(self.checkpoint.tensors):
            shape = self.checkpoint.tensors[name].shape
            if (m := _ONE_EXPERT.search(name)) and m["proj"] in EXPERT_PROJECTIONS:
                bid, expert = int(m["bid"]), int(m["expert"])
                if expert >= n_expert:
                    raise ConversionError(
                        f"layer {bid}: tensor {name} is expert {expert}, but config.json's {key} is {n_expert}"
                    )
                per_expert.setdefault((bid, EXPERT_PROJECTIONS[m["proj"]]), {})[expert] = name
            elif m := _FUSED_EXPERTS.search(name):
                combined.extend(self._split_fused(name, int(m["bid"]), m["proj"], shape, key, n_expert))
            elif m := _ROUTER.search(name):
                routers.append((m["bid"], name))
        for (bid, kind), experts in sorted(per_expert.items()):
            combined.append(self._stack(bid, kind, experts, key, n_expert))
        for bid, name in routers:  # after the experts: a message about those names the tensor at fault
            if (rows := self.checkpoint.tensors[name].shape[0]) != n_expert:
                raise ConversionError(
                    f"layer {bid}: router {name} scores {rows} experts, but config.json's {key} is {n_expert}"
                )
        return combined

    def _stack(
        self, bid: int, kind: gguf.MODEL_TENSOR, experts: dict[int, str], key: str, n_expert: int
    ) -> CombinedTensor:
        some = next(iter(experts.items()))
        missing = [x for x in range(n_expert) if x not in experts]
        if missing:
            absent = some[1].replace(f".experts.{some[0]}.", f".experts.{missing[0]}.")
            raise ConversionError(
                f"layer {bid}: {len(experts)} experts in the checkpoint, but config.json's {key} is "
                f"{n_expert} ({absent} is missing)"
            )
        shape = self.checkpoint.tensors[some[1]].shape
        for name in experts.values():
            if self.checkpoint.tensors[name].shape != shape:
                raise ConversionError(
                    f"layer {bid}: tensor {name} has shape {list(self.checkpoint.tensors[name].shape)}, "
                    f"unlike the layer's other experts ({list(shape)})"
                )
        return CombinedTensor(_block_tensor_name(kind, bid), tuple(experts[x] for x in range(n_expert)))

    def _split_fused(
        self, name: str, bid: int, proj: str, shape: tuple[int, ...], key: str, n_expert: int
    ) -> list[CombinedTensor]:
        if len(shape) != 3 or shape[0] != n_expert:
            raise ConversionError(
                f"layer {bid}: tensor {name} has shape {list(shape)}, not {n_expert} experts' matrices "
                f"(config.json's {key} is {n_expert})"
            )
        if proj == "down_proj":
            return [CombinedTensor(_block_tensor_name(gguf.MODEL_TENSOR.FFN_DOWN_EXP, bid), (name,), stack=False)]
        if shape[1] % 2:
            raise ConversionError(f"layer {bid}: tensor {name} has an odd number of rows ({shape[1]}): not gate + up")
        return [
            CombinedTensor(_block_tensor_name(kind, bid), (name,), stack=False, part=part, parts=2)
            for part, kind in enumerate((gguf.MODEL_TENSOR.FFN_GATE_EXP, gguf.MODEL_TENSOR.FFN_UP_EXP))
        ]

    @property
    def leading_dense_layers(self) -> tuple[int, str]:
        """How many layers come before the first mixture (dense MLPs: llama.cpp's
        leading_dense_block_count), and config.json's key for that count ("": every layer is a mixture)."""
        return 0, ""

    def check_tensors(self, gguf_names: Iterable[str]) -> None:
        """Every layer has its router and stacked experts, or, among the leading dense layers, its MLP."""
        names = set(gguf_names)
        super().check_tensors(names)
        n_dense, key = self.leading_dense_layers
        for bid in range(self.block_count):
            moe = bid >= n_dense
            missing = [n for n in (_block_tensor_name(k, bid) for k in (ROUTED if moe else DENSE)) if n not in names]
            if missing and not key:
                raise ConversionError(
                    f"layer {bid} has no complete mixture of experts ({missing[0]} is missing); "
                    f"llama.cpp's {self.arch_name} needs one in every layer"
                )
            if missing:
                raise ConversionError(
                    f"layer {bid} is incomplete: {missing[0]} is missing ({key} {n_dense} makes it "
                    f"{'a mixture of experts' if moe else 'dense'})"
                )


def _block_tensor_name(kind: gguf.MODEL_TENSOR, bid: int) -> str:
    return gguf.TENSOR_NAMES[kind].format(bid=bid) + ".weight"
