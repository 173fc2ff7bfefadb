"""``ppoison transfer``: build a transfer set by querying a defended victim.

    ppoison transfer POLICY VIC_DIR DEFENSE DEFENSE_ARGS --out_dir D --queryset Q [--budget N] ...

Writes into ``out_dir`` the transfer set (:mod:`ppoison_ext.attacks.transferset`), ``run_times.f64``
(seconds per black-box call) with ``run_times_summary.json``, and ``params_transfer.json``; the
defense writes ``distancetransfer.log.tsv`` and ``queriestransfer.{f32,json}``. ``--recover`` /
``--hardlabel`` add the defense-aware step (:mod:`.aware`).

Rerunning a killed run continues it with the same result as an uninterrupted one (the RNGs are
seeded per batch). VIC_DIR may be a ``ppoison serve`` URL: the server's defense answers and logs.
Sharding (random policy, black-box defenses): ``--num-shards S --shard-id I`` queries the batches
t with t % S == I into ``out_dir/shard-I``; ``--merge-shards S`` assembles them as one run would
have written them. Under ``torchrun`` each rank is a shard and rank 0 merges.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..attacks.knockoff import REWARDS, RUN_TIMES_FILE, STATE_FILES, KnockoffNets
from ..attacks.transferset import (INDEX_FILE, META, PATHS_FILE, X_FILE, Y_FILE, TransferSetError,
                                   TransferSetWriter, export_pickle, load_transferset)
from ..checks import int_arg
from ..client import is_url
from ..datasets import dataset_to_modelfamily, get_dataset, get_transform
from ..defenses import DEFENSE_NAMES, WB_DEFENSES, DefenseSpec, QueryLogger, read_queries
from ..devices import as_device
from ..fileio import atomic_save_bytes, atomic_write_json
from ..modeldir import dataset_name, modelfamily_for_dataset, read_params, write_params
from . import aware
from .common import check_dataset, local_blackbox, remote_blackbox
from .settings import CommonSettings, device_setting, entry_points, group_fields, setting

__all__ = ["build_parser", "main", "transfer", "merge_shards", "shard_dir", "TransferSettings", "LOG_PREFIX"]

logger = logging.getLogger(__name__)

LOG_PREFIX = "transfer"
LOG_EVERY = 1000


def shard_dir(out_dir, shard_id: int) -> Path:
    """Folder of shard ``shard_id`` of a sharded run."""
    return Path(out_dir) / f"shard-{int(shard_id)}"


def _committed(folder: Path) -> int:
    """Queries committed in a transfer-set folder (0 if there is none)."""
    if not (folder / META).exists() or not (folder / Y_FILE).exists():
        return 0
    try:
        return len(load_transferset(folder))
    except TransferSetError as err:
        raise ValueError(f"{folder}: cannot read the transfer set there ({err}); use --no-resume") from err


def _summary(folder: Path, batch_size: int, times: Sequence[float]) -> None:
    t = np.asarray(times, dtype=np.float64)
    t = t[np.isfinite(t)]
    atomic_write_json(folder / "run_times_summary.json", {
        "batch_size": int(batch_size),
        "mean": float(t.mean()) if t.size else None,
        "std": float(t.std()) if t.size else None,
    })


def _shard_env(num_shards: Optional[int], shard_id: Optional[int]):
    """(S, I, under_torchrun) from the flags, else from torchrun's RANK / WORLD_SIZE."""
    if num_shards is None and shard_id is None:
        ws = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if ws > 1:
            return ws, int(os.environ.get("RANK", "0")), True
        return 1, 0, False
    if num_shards is None or shard_id is None:
        raise ValueError("--num-shards and --shard-id go together")
    num_shards = int_arg(num_shards, "num_shards")
    return num_shards, int_arg(shard_id, "shard_id", low=0, high=num_shards - 1), False


def transfer(*args: Any, **kwargs: Any) -> Path:
    """Builds a transfer set: ``TransferSettings.of(*args, **kwargs).run()``."""
    return TransferSettings.of(*args, **kwargs).run()


def _shard_run(folder: Path) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The transfer-set description of a shard and its ``knockoff`` run settings."""
    try:
        meta = json.loads((folder / META).read_text())
        return meta, meta["knockoff"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{folder}: not a shard of a transfer run ({err})") from err


def _expected_shard_size(run: Dict[str, Any], shard: int) -> int:
    B, nq, S = run["batch_size"], run["nqueries"], run["num_shards"]
    n_batches = -(-nq // B)
    return sum(min(B, nq - t * B) for t in range(shard, n_batches, S))


def _wait_for_shards(out_dir: Path, S: int, timeout: Optional[float]) -> None:
    start = time.monotonic()
    while True:
        pending = []
        for i in range(S):
            folder = shard_dir(out_dir, i)
            try:
                complete = ((folder / "params_transfer.json").exists()
                            and _committed(folder) == _expected_shard_size(_shard_run(folder)[1], i))
            except ValueError:
                complete = False
            if not complete:
                pending.append(i)
        if not pending:
            return
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(f"shards {pending} of {out_dir} did not finish within {timeout} s")
        time.sleep(2.0)


def merge_shards(out_dir, num_shards: int, *, export_pickle_file: bool = False,
                 progress: bool = True) -> Path:
    """Assembles ``out_dir/shard-0 .. shard-{S-1}`` into ``out_dir`` as one unsharded run."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    S = int_arg(num_shards, "num_shards", low=2)
    shards, runs, metas = [], [], []
    for i in range(S):
        folder = shard_dir(out_dir, i)
        meta, run = _shard_run(folder)
        if run.get("num_shards") != S or run.get("shard_id") != i:
            raise ValueError(f"merge: {folder} is shard {run.get('shard_id')} of {run.get('num_shards')}, "
                             f"not {i} of {S}")
        ts = load_transferset(folder)
        want = _expected_shard_size(run, i)
        if len(ts) != want:
            raise ValueError(f"merge: shard {i} is incomplete ({len(ts)} of {want} queries); rerun it")
        shards.append(ts)
        runs.append(run)
        metas.append(meta)
    base = {k: v for k, v in runs[0].items() if k != "shard_id"}
    for i, run in enumerate(runs):
        if {k: v for k, v in run.items() if k != "shard_id"} != base:
            raise ValueError(f"merge: shard {i} was built with other settings than shard 0")
    B, nq, qpi = base["batch_size"], base["nqueries"], base["qpi"]
    n_batches = -(-nq // B)
    ts0 = shards[0]
    own = ("num_classes", "kind", "image_shape", "format_version")
    desc = {k: v for k, v in metas[0].items() if k not in own}
    desc.update(knockoff=dict(base, num_shards=1, shard_id=0), merged_from_shards=S)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".merge-"))
    try:
        writer = TransferSetWriter(tmp, num_classes=ts0.num_classes, kind=ts0.kind,
                                   image_shape=ts0.meta.get("image_shape"), meta=desc, resume=False)
        logs = [read_queries(shard_dir(out_dir, i), LOG_PREFIX, with_k=True)
                if (shard_dir(out_dir, i) / f"queries{LOG_PREFIX}.json").exists() else None for i in range(S)]
        qlog = (QueryLogger(tmp, prefix=LOG_PREFIX, every=LOG_EVERY)
                if all(lg is not None for lg in logs) else None)
        times_in = [np.fromfile(shard_dir(out_dir, i) / RUN_TIMES_FILE, dtype="<f8")
                    if (shard_dir(out_dir, i) / RUN_TIMES_FILE).exists() else np.zeros(0) for i in range(S)]
        times: List[float] = []
        for t in tqdm(range(n_batches), disable=not progress, desc="merging shards", unit="batch"):
            s, j = t % S, t // S
            size = min(B, nq - t * B)
            lo, hi = j * B, j * B + size
            ts = shards[s]
            x = ts.paths[lo:hi] if ts.kind == "paths" else np.asarray(ts.images[lo:hi])
            writer.append(ts.indices[lo:hi], x, ts.y[lo:hi])
            if qlog is not None:
                rows, K = logs[s]
                for c in range(qpi):
                    blk = torch.from_numpy(rows[lo * qpi + c * size: lo * qpi + (c + 1) * size].copy())
                    qlog.log(blk[:, :K], blk[:, K:2 * K], blk[:, 2 * K], blk[:, 2 * K + 1])
            times.extend(times_in[s][j * qpi:(j + 1) * qpi].tolist())
        writer.close()
        if qlog is not None:
            qlog.close()
        atomic_save_bytes(tmp / RUN_TIMES_FILE, np.asarray(times, dtype="<f8").tobytes())
        _summary(tmp, B, times)
        try:
            params = json.loads((shard_dir(out_dir, 0) / "params_transfer.json").read_text())
        except (OSError, ValueError):
            params = {}
        params.pop("created_on", None)
        params.update(num_shards=S, shard_id=None, merged_from_shards=S)
        write_params(tmp / "params_transfer.json", params)
        # Data files first, the description last, so a reader never sees more rows than exist.
        order = [X_FILE, PATHS_FILE, INDEX_FILE, Y_FILE]
        names = sorted(p.name for p in tmp.iterdir())
        rest = [n for n in names if n not in order and n != META]
        for name in [n for n in order if n in names] + rest + [META]:
            os.replace(tmp / name, out_dir / name)
        for name in STATE_FILES:
            (out_dir / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if export_pickle_file:
        export_pickle(out_dir)
    logger.info("merged %d shards into %s (%d queries)", S, out_dir, nq)
    return out_dir


_ADAPTIVE = "adaptive policy"
_AWARE = aware.AWARE_GROUP


@dataclass(kw_only=True)
class TransferSettings(CommonSettings):
    """Construct a transfer set by querying a (defended) victim (Knockoff Nets, random or adaptive policy)."""

    policy: str = setting(metavar="PI", choices=["random", "adaptive"], help="query policy: %(choices)s")
    victim_model_dir: str = setting(metavar="PATH", help="victim folder, or a served victim's URL")
    defense: Optional[str] = setting(default=None, metavar="TYPE", choices=list(DEFENSE_NAMES),
                                     help="defense: %(choices)s (left out when VIC_DIR is a URL)")
    defense_args: Optional[str] = setting(default=None, metavar="STR",
                                          help='defense arguments "k1:v1,k2:v2,..." (none with a URL)')
    api_key_file: Optional[str] = setting("--api-key-file", default=None, metavar="FILE",
                                          help="API key of a served victim (VIC_DIR a URL)")
    out_dir: str = setting("--out_dir", metavar="PATH", help="folder of the transfer set")
    budget: Optional[int] = setting("--budget", default=None, metavar="N", help="# distinct images (all)")
    nqueries: Optional[int] = setting("--nqueries", default=None, metavar="N",
                                      help="# queries (default: budget)")
    qpi: int = setting("--qpi", default=1, metavar="N", help="# queries per image (posteriors averaged)")
    queryset: str = setting("--queryset", metavar="TYPE", help="adversary's dataset (P_A(X))")
    batch_size: int = setting("--batch_size", default=256, metavar="B", help="queries per black-box call")
    device_id: int = device_setting("GPU id, -1 for the CPU")
    nworkers: int = setting("-w", "--nworkers", default=10, metavar="N", help="image-loading workers")
    train_transform: bool = setting("--train_transform", default=False, help="augment the query images")
    export_pickle_file: bool = setting("--export-pickle", default=False, help="also write transferset.pickle")
    resume: bool = setting("--resume", default=True, help="continue a run interrupted in out_dir (default)")
    num_shards: Optional[int] = setting("--num-shards", default=None, help="split the batches into S shards")
    shard_id: Optional[int] = setting("--shard-id", default=None, help="the shard this process builds")
    merge_shards: Optional[int] = setting("--merge-shards", default=None, metavar="S",
                                          help="only merge out_dir/shard-0..S-1 into out_dir")
    merge_timeout: Optional[float] = setting("--merge-timeout", default=None,
                                             help="torchrun: seconds rank 0 waits for the other shards")
    reward: str = setting("--reward", default="all", choices=list(REWARDS), group=_ADAPTIVE)
    alpha: float = setting("--alpha", default=0.1, help="bandit step size", group=_ADAPTIVE)
    delta: int = setting("--delta", default=25, help="window of the diversity reward", group=_ADAPTIVE)
    online_lr: float = setting("--online-lr", default=0.01, help="online knockoff SGD lr", group=_ADAPTIVE)
    hierarchy: Optional[str] = setting("--hierarchy", default=None, metavar="JSON", group=_ADAPTIVE,
                                       help='{"coarse": [fine labels]} file')
    hardlabel: bool = setting("--hardlabel", default=False, group=_AWARE, help="Top-1: one-hot labels")
    recover: str = setting("--recover", default="none", choices=aware.RESTORERS, group=_AWARE,
                           help="restorer: none | pbayes (Partial Bayes) | ddae (D-DAE / D-DAE+ MLP)")
    recover_table: str = setting("--recover-table", default="dirichlet", choices=["dirichlet", "shadow"],
                                 group=_AWARE, help="true samples: dirichlet (D-DAE+, Partial Bayes) | shadow (D-DAE)")
    dirichlet_prior: str = setting("--dirichlet-prior", default="sparse", choices=["sparse", "released", "oracle"],
                                   group=_AWARE, help="sparse Dirichlet(1/K) (default) | centred on the released "
                                   "outputs | oracle: centred on the clean outputs (leaks them)")
    table_size: int = setting("--table-size", default=1_000_000, metavar="N", group=_AWARE,
                              help="recovery table size (default: 1e6)")
    concentration: float = setting("--concentration", default=8.0, group=_AWARE,
                                   help="centred Dirichlet concentration factor (default: 8)")
    recover_norm: float = setting("--recover-norm", default=1.0, group=_AWARE, help="Partial Bayes L_p (default 1)")
    tolerance: float = setting("--tolerance", default=0.01, group=_AWARE, help="Partial Bayes tolerance (0.01)")
    top1_recover: Optional[bool] = setting("--top1-recover", default=None, group=_AWARE,
                                           help="Partial Bayes: only candidates with the same top-1 "
                                           "(default: when the defense keeps the top-1)")
    recover_epochs: int = setting("--recover-epochs", default=200, group=_AWARE, help="D-DAE epochs (200)")
    recover_batch_size: int = setting("--recover-batch-size", default=1024, group=_AWARE,
                                      help="D-DAE batch (1024)")
    recover_bn_train: bool = setting("--recover-bn-train", default=False, group=_AWARE,
                                     help="D-DAE: restore in train-mode BatchNorm, one batch")
    epsilon_filter: Optional[float] = setting("--epsilon-filter", default=None, group=_AWARE,
                                              help="keep table pairs within this L1 distance (default: "
                                              "ModelGuard-S's epsilon, else inf: every pair)")
    shadow_dir: Optional[str] = setting("--shadow-dir", default=None, metavar="DIR", group=_AWARE,
                                        help="shadow models (default: out_dir/shadows; trained when missing)")
    num_shadows: int = setting("--num-shadows", default=20, group=_AWARE, help="shadow models (20)")
    shadow_epochs: int = setting("--shadow-epochs", default=5, group=_AWARE, help="shadow training epochs (5)")
    shadow_images: Optional[int] = setting("--shadow-images", default=None, metavar="N", group=_AWARE,
                                           help="images per shadow (default: the pool split evenly)")
    shadow_dataset: Optional[str] = setting("--shadow-dataset", default=None, group=_AWARE,
                                            help="shadow training data (default: the victim's)")
    aware_out: Optional[str] = setting("--aware-out", default=None, metavar="DIR", group=_AWARE,
                                       help="folder of the defense-aware transfer set (default: out_dir/aware)")

    def run(self) -> Path:
        """Builds the transfer set (or only merges the shards), then the defense-aware one if asked;
        returns the folder written (``out_dir``, or ``out_dir/shard-I`` for a lone shard)."""
        if self.merge_shards is not None:
            return merge_shards(self.out_dir, self.merge_shards, export_pickle_file=self.export_pickle_file,
                                progress=not self.no_progress)
        folder = self._query()
        if aware.aware_requested(self) and Path(folder) == Path(self.out_dir):  # not for a lone shard
            aware.postprocess_transfer(self, folder)
        return folder

    def _query(self) -> Path:
        policy, victim_dir, defense, seed = self.policy, self.victim_model_dir, self.defense, self.seed
        if policy not in ("random", "adaptive"):
            raise ValueError(f"policy must be 'random' or 'adaptive', got {policy!r}")
        remote = is_url(str(victim_dir))
        if not remote and defense not in DEFENSE_NAMES:
            raise ValueError(f"defense must be one of {list(DEFENSE_NAMES)}, got {defense!r}")
        S, I, under_torchrun = _shard_env(self.num_shards, self.shard_id)
        if S > 1 and policy != "random":
            raise ValueError("--num-shards needs the random policy (the adaptive policy is sequential)")
        if S > 1 and defense in WB_DEFENSES:
            raise ValueError(f"--num-shards cannot be used with {defense} (its online attacker is sequential)")
        spec = None if remote else DefenseSpec.parse(defense, self.defense_args)  # fail early, before loading
        parsed = {} if spec is None else spec.args
        out_dir = Path(self.out_dir)
        folder = shard_dir(out_dir, I) if S > 1 else out_dir
        folder.mkdir(parents=True, exist_ok=True)
        log_dir = Path(parsed["out_path"]) if parsed.get("out_path") and S == 1 else folder

        device = as_device(self.device_id)
        if under_torchrun and device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.manual_seed(seed)
        transform = get_transform(dataset_to_modelfamily[check_dataset(self.queryset, "queryset")],
                                  "train" if self.train_transform else "test")
        qs = get_dataset(self.queryset, train=True, transform=transform, root=self.data_root)
        budget = len(qs) if self.budget is None else self.budget

        workers = 0 if self.train_transform else min(int(self.nworkers), os.cpu_count() or 1)
        progress = not self.no_progress
        attack = KnockoffNets(strategy=policy, budget=budget, nqueries=self.nqueries, batch_size=self.batch_size,
                              qpi=self.qpi, seed=seed, reward=self.reward, alpha=self.alpha, delta=self.delta,
                              hierarchy=self.hierarchy, online_lr=self.online_lr, num_workers=workers,
                              progress=progress and (not under_torchrun or I == 0))
        done = 0
        if not self.resume:
            for name in ("params_transfer.json", "run_times_summary.json"):
                (folder / name).unlink(missing_ok=True)
        else:
            done = attack.prepare_resume(folder, len(qs), S, I)  # before touching any log
        if remote:  # the server keeps the query log (per API key) and seeds its own defense
            qlog = None
            bb, defense, vparams = remote_blackbox(victim_dir, defense, self.defense_args, self.api_key_file)
        else:
            qlog = QueryLogger(log_dir, prefix=LOG_PREFIX, every=LOG_EVERY, resume=self.resume)
            if self.resume:
                qlog.truncate(done * self.qpi)  # queries answered but never committed to the transfer set
            bb = local_blackbox(spec, victim_dir, qlog, device, log_dir, self.data_root)
            vparams = read_params(victim_dir)
        kwargs = {**parsed, "log_prefix": LOG_PREFIX}
        K = int(vparams["num_classes"])
        if policy == "adaptive" and self.reward in ("loss", "all"):
            from ..models import get_net

            torch.manual_seed(seed)
            family = modelfamily_for_dataset(dataset_name(vparams))
            attack.online_model = get_net(vparams["model_arch"], family, num_classes=K).to(device)
        meta = {"victim_model_dir": str(victim_dir), "defense": defense, "defense_args": self.defense_args,
                "queryset": self.queryset, "train_transform": bool(self.train_transform)}
        logger.info("transfer: %s, %s %s, queryset %s, %s", attack, defense, parsed, self.queryset, folder)
        if done:
            logger.info("transfer: resuming after %d committed queries", done)
        attack.build_transferset(bb, qs, folder, resume=self.resume, device=device, num_classes=K, meta=meta,
                                 num_shards=S, shard_id=I)
        if qlog is not None:
            qlog.close()  # only on success: the tail row after the last multiple of 1000
        _summary(folder, self.batch_size, attack.run_times)
        unrecorded = set(_UNRECORDED) | set(group_fields(TransferSettings, _AWARE))
        if policy != "adaptive":
            unrecorded |= set(group_fields(TransferSettings, _ADAPTIVE))
        params = {k: v for k, v in self.params().items() if k not in unrecorded}
        params.update(defense=defense, budget=budget, num_shards=S, shard_id=I)
        for k, v in kwargs.items():
            params.setdefault(k, v)
        params["defense_kwargs"] = kwargs
        write_params(folder / "params_transfer.json", params)
        if S > 1:
            if not under_torchrun or I != 0:
                return folder
            _wait_for_shards(out_dir, S, self.merge_timeout)
            merge_shards(out_dir, S, export_pickle_file=self.export_pickle_file, progress=progress)
            return out_dir
        if self.export_pickle_file:
            export_pickle(folder)
        return folder


#: settings ``params_transfer.json`` leaves out (besides the defense-aware and unused adaptive ones)
_UNRECORDED = ("api_key_file", "export_pickle_file", "resume", "merge_shards", "merge_timeout")


build_parser, main = entry_points(TransferSettings)


if __name__ == "__main__":
    raise SystemExit(main(prog=f"python -m {__spec__.name}"))
