"""VeRA (Kopiczko et al., ICLR 2024): frozen random projections shared by every layer (seeded by
peft's ``projection_prng_key``, so every party regenerates them) and two trained scaling vectors
per module, ``ΔW = Λ_b B Λ_d A``; only the vectors travel, and the saved adapter omits the
projections too (``save_projection=False``: ``PeftModel.from_pretrained`` regenerates them from
the key with a CPU generator, the same on every machine with this torch)."""

from __future__ import annotations

import warnings

from fedpeft.methods.base import PeftMethod


def _vera(model, peft, task_type):
    from peft import VeraConfig  # here, not at import: listing the methods needs no peft
    with warnings.catch_warnings():  # the projections are regenerated from projection_prng_key, by design
        warnings.filterwarnings("ignore", message="Specified to not save vera_A and vera_B")
        return VeraConfig(task_type=task_type, r=peft.vera_rank, target_modules=list(model.target_modules),
                          vera_dropout=model.dropout, projection_prng_key=0, save_projection=False)


METHODS = [
    PeftMethod("vera", _vera, {"vector": r"\.vera_lambda_[bd]$"},
               about="ΔW = Λ_b·B·Λ_d·A (shared frozen A, B)", options=("vera_rank",)),
]
