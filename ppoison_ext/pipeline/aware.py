"""The defense-aware step after ``ppoison transfer`` (``--recover`` / ``--hardlabel``): restores
and/or hard-labels the raw transfer set in ``out_dir`` into ``--aware-out`` (default
``out_dir/aware``), with ``recover_table.pt`` and ``params_aware.json``; train on it with
``ppoison train-attacker OUT_DIR ... --transferset-subdir aware``. The recovery table comes from a
fresh white-box copy of the defense (its calls are no victim queries); a stateful one (ModelGuard-S)
gets the state the transfer run left (its last snapshot), looked up frozen. D-DAE's shadow models are
trained on demand into ``--shadow-dir`` (:mod:`ppoison_ext.attacks.shadow`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from ..attacks.aware import AWARE_SUBDIR, DefenseAware
from ..attacks.restorers import DDAE, PartialBayes
from ..attacks.runstate import STATE_FILES, StateSlots
from ..attacks.shadow import load_shadow_models, shadow_folders, train_shadow_models
from ..attacks.transferset import load_transferset
from ..datasets import dataset_to_modelfamily, get_transform
from ..defenses import WB_DEFENSES, DefenseSpec, build_defense
from ..devices import as_device
from ..modeldir import dataset_name, read_params, write_params
from .settings import group_fields

__all__ = ["RESTORERS", "AWARE_GROUP", "aware_requested", "postprocess_transfer"]

logger = logging.getLogger(__name__)

#: ``--recover`` choices
RESTORERS = ("none", "pbayes", "ddae")
#: the --help section of the step's settings in ``TransferSettings`` (and the grid's keys for it)
AWARE_GROUP = "defense-aware attack"


def aware_requested(s: Any) -> bool:
    """Whether the settings ``s`` ask for the defense-aware step."""
    return bool(s.hardlabel) or s.recover != "none"


def _restorer(s: Any, device) -> Optional[Any]:
    if s.recover == "pbayes":
        return PartialBayes(norm=s.recover_norm, tolerance=s.tolerance, top1_recover=s.top1_recover)
    if s.recover == "ddae":
        return DDAE(epochs=s.recover_epochs, batch_size=s.recover_batch_size, train_mode_bn=s.recover_bn_train,
                    seed=s.seed, device=device, progress=not s.no_progress)
    return None


def postprocess_transfer(s: Any, folder: Path) -> Path:
    """Restores / hard-labels the transfer set in ``folder`` (``s``: ``TransferSettings``)."""
    if s.recover not in RESTORERS:
        raise ValueError(f"recover must be one of {list(RESTORERS)}, got {s.recover!r}")
    if s.recover != "none" and s.defense in WB_DEFENSES:
        raise ValueError(f"--recover cannot be used with the white-box defense {s.defense!r} (its state evolves "
                         "with the queries, so no fixed perturbation function exists)")
    dev = as_device(s.device_id)
    spec = DefenseSpec.parse(s.defense, s.defense_args)
    folder = Path(folder)
    out = Path(s.aware_out) if s.aware_out else folder / AWARE_SUBDIR
    raw = load_transferset(folder)
    family = dataset_to_modelfamily[s.queryset]
    transform = get_transform(family, "train" if s.train_transform else "test")
    shadows = None
    if s.recover != "none" and s.recover_table == "shadow":
        vparams = read_params(s.victim_model_dir)
        shadow_dir = Path(s.shadow_dir) if s.shadow_dir else folder / "shadows"
        if len(shadow_folders(shadow_dir)) < s.num_shadows:
            train_shadow_models(shadow_dir, dataset=s.shadow_dataset or dataset_name(vparams),
                                arch=vparams["model_arch"], num_classes=int(vparams["num_classes"]),
                                num_shadows=s.num_shadows, epochs=s.shadow_epochs, per_shadow=s.shadow_images,
                                seed=s.seed, device=dev, data_root=s.data_root, progress=not s.no_progress)
        shadows = load_shadow_models(shadow_dir, device=dev, limit=s.num_shadows)
    defense = build_defense(spec, victim_dir=s.victim_model_dir, device=dev) if s.recover != "none" else None
    if defense is not None and defense.stateful:  # the defender's state after the thief's queries
        states = StateSlots(folder).load(len(raw))
        if states is None:
            raise ValueError(f"{folder}: no snapshot of the {s.defense} state after its {len(raw)} queries "
                             f"({', '.join(STATE_FILES)}); run the transfer step locally first")
        defense.set_state(states["blackbox"])
    attack = DefenseAware(restorer=_restorer(s, dev), table_source=s.recover_table, prior=s.dirichlet_prior,
                          table_size=s.table_size, concentration=s.concentration, epsilon=s.epsilon_filter,
                          shadows=shadows, hard_label=s.hardlabel, seed=s.seed)
    attack.postprocess(raw, defense, out, transform=transform)
    record = {k: getattr(s, k) for k in group_fields(type(s), AWARE_GROUP) if k != "aware_out"}
    record["seed"] = s.seed
    record.update(raw_transferset=str(folder), leaks_clean_posteriors=bool(
        attack.table is not None and attack.table.meta.get("leaks_clean_posteriors")))
    write_params(out / "params_aware.json", record)
    logger.info("defense-aware transfer set (%s, hard labels %s) in %s", s.recover, s.hardlabel, out)
    return out
