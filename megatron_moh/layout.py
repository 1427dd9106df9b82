"""A model's layout, in one place for the config, the command line, checkpoints' stored arguments
and the Hugging Face conversion: which attention heads are shared or routed, with which router and
gates (`MoHLayout`), and which layers have an MoE MLP (`moe_layer_pattern`).

Free of megatron-core, so that the checkpoint checks and the conversion tool's command line use it
before megatron is imported; `megatron_moh.config` builds the TransformerConfig from it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

ROUTERS = ("learned", "query_norm")
GATES = ("weighted", "binary")
LAYOUT_PRESETS = ("dense", "published")
# How a layer skips the heads a token did not choose (not part of the layout: speed, not function).
ATTENTION_IMPLS = ("auto", "dense", "sparse")


class MoHConfigError(ValueError):
    """A MoH setting that cannot work; the message names the field and the fix."""


@dataclass(frozen=True)
class MoHLayout:
    """Which query heads are shared, how many routed heads a token keeps, and the router and gates:
    the ``moh_*`` fields that fix a model's weights and function, in one place for the config, the
    command line, checkpoints' stored arguments and the Hugging Face conversion.

    None fields take the paper's defaults for a head count (`resolved`). The self-contained
    ``hf/configuration_moh.py`` keeps a copy of the defaults and checks (it travels with exports);
    tests/unit/test_config.py holds the two in step.
    """

    num_shared_heads: int | None = None
    topk: int | None = None
    router: str = "learned"
    gate: str | None = None
    two_stage: bool | None = None

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The ``moh_*`` names of the fields in configs, arguments and Hugging Face configs."""
        return tuple(f"moh_{f.name}" for f in fields(cls))

    @classmethod
    def of(cls, source: Any) -> MoHLayout:
        """The layout a MoHTransformerConfig, a run's or checkpoint's arguments or a MoH-Llama
        config holds (fields it lacks or leaves None: defaults)."""
        values = {f.name: getattr(source, f"moh_{f.name}", None) for f in fields(cls)}
        return cls(**{name: value for name, value in values.items() if value is not None})

    @classmethod
    def preset(cls, name: str, heads: int) -> MoHLayout:
        """``dense``: every head shared with binary gates, so every gate is exactly 1 and the model
        computes what plain attention does. ``published``: the published MoH-LLaMA3 layout, first
        50% of heads shared, 25% of heads routed-active, query-norm router, binary gates."""
        if name == "dense":
            return cls(num_shared_heads=heads, topk=0, router="query_norm", gate="binary", two_stage=False)
        if name == "published":
            return cls(num_shared_heads=int(heads * 0.5), topk=int(heads * 0.25), router="query_norm",
                       gate="binary", two_stage=False)
        raise MoHConfigError(f"layout={name!r} is unknown: use a MoHLayout or one of {', '.join(LAYOUT_PRESETS)}")

    def resolved(self, heads: int) -> MoHLayout:
        """This layout with its None fields filled for ``heads`` query heads: 50% of heads shared and
        25% routed-active (75% of heads active), as in the MoH-LLaMA3 recipe; binary gates for the
        query-norm router, weighted gates for the learned one, with two stages when there are both
        shared and routed heads."""
        shared = heads // 2 if self.num_shared_heads is None else self.num_shared_heads
        topk = min(max(heads // 4, 1), heads - shared) if self.topk is None else self.topk
        gate = ("binary" if self.router == "query_norm" else "weighted") if self.gate is None else self.gate
        two_stage = (self.router == "learned" and gate == "weighted" and 0 < shared < heads
                     if self.two_stage is None else self.two_stage)
        return replace(self, num_shared_heads=shared, topk=topk, gate=gate, two_stage=two_stage)

    def check(self, heads: int, groups: int | None = None, tp: int = 1) -> None:
        """Raise MoHConfigError (one line: what is wrong and how to fix it) if a resolved layout
        cannot run with ``heads`` query heads in ``groups`` key/value groups at TP size ``tp``."""
        groups = groups or heads
        shared, topk = self.num_shared_heads, self.topk
        routed = heads - shared

        def fail(msg: str) -> None:
            raise MoHConfigError(msg)

        if heads % tp:
            fail(f"num_attention_heads={heads} is not divisible by tensor_model_parallel_size={tp}: "
                 f"choose a TP size that divides the number of heads")
        if heads % groups:
            fail(f"num_query_groups={groups} does not divide num_attention_heads={heads}: "
                 f"choose a number of query groups that divides the heads")
        if groups % tp and tp % groups:
            fail(f"num_query_groups={groups} and tensor_model_parallel_size={tp} must divide one "
                 f"another: change --num-query-groups or the TP size")
        if self.router not in ROUTERS:
            fail(f"moh_router={self.router!r} is unknown: use one of {', '.join(ROUTERS)}")
        if self.gate not in GATES:
            fail(f"moh_gate={self.gate!r} is unknown: use one of {', '.join(GATES)}")
        if shared < 0:
            fail(f"moh_num_shared_heads={shared} is negative: use 0 or more")
        if shared >= heads and topk:
            fail(f"moh_num_shared_heads={shared} leaves no routed heads of {heads} but moh_topk={topk}: "
                 f"set moh_topk=0 or use fewer shared heads")
        if shared > heads:
            fail(f"moh_num_shared_heads={shared} is more than num_attention_heads={heads}: "
                 f"use at most {heads}")
        if topk < 0 or topk > routed:
            fail(f"moh_topk={topk} must be between 0 and the {routed} routed heads "
                 f"(num_attention_heads - moh_num_shared_heads): lower moh_topk")
        if routed > 0 and topk == 0:
            fail(f"moh_topk=0 leaves the {routed} routed heads unused: set moh_topk >= 1 "
                 f"or make every head shared with moh_num_shared_heads={heads}")
        if self.two_stage and not (self.router == "learned" and self.gate == "weighted"):
            fail("moh_two_stage needs moh_router='learned' and moh_gate='weighted': "
                 "turn two-stage weights off for this router or gate")
        if self.two_stage and (shared == 0 or routed == 0):
            fail(f"moh_two_stage weighs shared against routed heads but there are {shared} shared and "
                 f"{routed} routed: turn two-stage weights off")
        if self.router == "query_norm" and 0 < routed < 2:
            fail("the query_norm router scales query norms by their std over routed heads and needs "
                 "at least 2 routed heads: use fewer shared heads")

    def gates_are_one(self, heads: int) -> bool:
        """Whether every gate is exactly 1, so that the layer is plain attention: every head shared,
        and binary gates or the query-norm router (learned weighted gates ``h_s * softmax(W_s x)``
        are 1 only up to rounding, and only while the router weight is zero)."""
        return (self.topk == 0 and self.num_shared_heads == heads
                and (self.gate == "binary" or self.router == "query_norm"))

    def as_fields(self) -> dict[str, Any]:
        """``{moh_field: value}``: keyword arguments of a MoHTransformerConfig or MoHLlamaConfig."""
        return {f"moh_{f.name}": getattr(self, f.name) for f in fields(self)}

    def set_on(self, target: Any) -> None:
        """Write the fields onto a config or an argparse Namespace."""
        for name, value in self.as_fields().items():
            setattr(target, name, value)

    def flags(self) -> list[str]:
        """The pretrain_moh.py flags that set this layout (None fields: none, so they default)."""
        out: list[str] = []
        for name, value in self.as_fields().items():
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool):
                out.append(flag if value else flag.replace("--", "--no-", 1))
            elif value is not None:
                out += [flag, str(value)]
        return out


def moe_layer_pattern(freq: int | list[int], num_layers: int) -> list[bool]:
    """Which of ``num_layers`` layers (from 0) have an MoE MLP, as megatron's
    ``get_gpt_decoder_layer_specs`` reads ``--moe-layer-freq``: N puts one on every Nth layer
    starting with the first, a list gives 1 (MoE) or 0 (dense) per layer. ValueError (one line)
    for anything else."""
    if isinstance(freq, int):
        if freq < 1:
            raise ValueError(f"--moe-layer-freq {freq} must be at least 1 (an MoE MLP every N layers)")
        return [layer % freq == 0 for layer in range(num_layers)]
    if len(freq) != num_layers or set(freq) - {0, 1}:
        raise ValueError(f"--moe-layer-freq {freq} must give 0 (dense) or 1 (MoE) for each of the "
                         f"{num_layers} layers")
    return [bool(moe) for moe in freq]
