"""ppoison_ext: the Prediction Poisoning (MAD) defense and model-stealing attacks, with
native C++/CUDA kernels for PyTorch.

The public API is loaded on first use (PEP 562), so ``import ppoison_ext`` stays cheap::

    import ppoison_ext as pp
    model, params = pp.load_model_dir("models/victim/MNIST-lenet")
    mad = pp.MAD(model, epsilon=0.5)

:data:`HAS_OPS` says whether the native kernels loaded; without them every op in :mod:`ops`
runs its pure-PyTorch twin in :mod:`reference` (:func:`native_info` says which path runs).
"""

from importlib import import_module as _import_module

__version__ = "0.1.0"

_DEFENSES = (
    "Defense", "DefenseOutput", "Blackbox", "MAD", "ReverseSigmoid", "RandomNoise", "WhiteboxDefense",
    "GRAD2", "MADGR", "ReverseSigmoidGR", "RandomGR", "flatten_params", "watermark_target",
    "AdaptiveMisinformation", "AMComponents", "AM_VARIANTS", "ModelGuardW", "ModelGuardS",
    "build_defense", "DefenseSpec", "parse_defense_args", "DEFENSE_NAMES", "DEFENSE_KEYS", "WB_DEFENSES",
    "QueryLogger", "read_queries", "ProxyView", "DAWN", "new_watermark_key", "read_watermark_key",
)
_ATTACKS = (
    "Attack", "KnockoffNets", "AdaptivePolicy", "random_query_order", "JacobianAdversary", "AugmentedSet",
    "save_augmented_set", "DefenseAware", "Smoothing", "Top1", "RecoveryTable", "build_recovery_table",
    "dirichlet_samples", "Restorer", "PartialBayes", "DDAE", "hard_labels", "transform_transferset",
    "S4LCriterion", "rotation_batch", "train_shadow_models", "load_shadow_models", "TransferSet",
    "TransferSetError", "TransferSetWriter", "export_pickle", "load_transferset",
)
_PIPELINE = {
    "victim": ("train_victim", "make_proxy", "VictimSettings"),
    "transfer": ("transfer", "merge_shards", "TransferSettings"),
    "attacker": ("train_attacker", "parse_budgets", "AttackerSettings"),
    "evaluate": ("eval_bbox", "EvalSettings"),
    "jacobian": ("run_jacobian", "JacobianSettings"),
    "grid": ("run_grid", "load_config", "collect_results", "GridConfig"),
    "demo": ("run_demo",),
    "verify": ("verify_ownership", "OwnershipClaim"),
}

#: public name -> (module, attribute in it); a module itself when the attribute is None.
_LAZY = {
    **{name: (".defenses", name) for name in _DEFENSES},
    **{name: (".attacks", name) for name in _ATTACKS},
    "JBDA": (".attacks", "JacobianAdversary"),
    **{name: (f".pipeline.{step}", name) for step, names in _PIPELINE.items() for name in names},
    "load_model_dir": (".modeldir", "load_model_dir"),
    "read_params": (".modeldir", "read_params"),
    "get_net": (".models", "get_net"),
    "get_dataset": (".datasets", "get_dataset"),
    "as_device": (".devices", "as_device"),
    "native_info": ("._native", "native_info"),
    "HAS_OPS": ("._native", "HAS_OPS"),
    "ops": (".ops", None),
    "reference": (".reference", None),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    try:
        module_name, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    module = _import_module(module_name, __name__)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
