"""What a serving process holds: the catalog and model snapshot, loaded at start and hot-reloaded.

A :class:`Snapshot` is immutable; a request takes one reference at its start and uses it to
the end, so swapping in a new catalog or model version never disturbs a request in flight.
A catalog or model that fails to load is refused: the old snapshot keeps serving, with a log
line and a metric. :class:`Runtime` checks the catalog file and the registry's ``current`` pointer
every ``reload_interval_s`` seconds (``RETENTION_RELOAD_INTERVAL_S``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.catalog import Catalog, CatalogError, CatalogMessage
from models.experiment import Experiment, ExperimentError, read_experiment, write_experiment
from serving.catalog_content import content_problems
from serving.schemas import DecodedRealtimeRequestBody

log = logging.getLogger("retention.state")


@dataclasses.dataclass(frozen=True, slots=True)
class ModelBundle:
    """A loaded model version with its featurizer compiled against the current catalog."""

    version: str
    featurizer: Any  # models.features.Featurizer
    scorer: Any  # models.scoring.Scorer
    schema_sha256: str

    def score(
        self, request: DecodedRealtimeRequestBody, profile: Mapping[str, object] | None,
        candidates: Sequence[CatalogMessage],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return the float32 K-row feature matrix of one request and the float64 P(stay) of each row."""
        X = self.featurize(request, profile, candidates)
        return X, np.asarray(self.scorer.p_stay(X), dtype=np.float64)

    def featurize(
        self, request: DecodedRealtimeRequestBody, profile: Mapping[str, object] | None,
        candidates: Sequence[CatalogMessage],
    ) -> np.ndarray:
        """Return the float32 K-row feature matrix of one request (what :meth:`score` feeds the model)."""
        return self.featurizer.matrix(
            product_id=request.productId,
            user_locale=request.userLocale,
            environment=request.rawEnvironment,
            signed_date_ms=request.signedDate,
            profile=profile,
            candidates=candidates,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """The catalog and models one request uses from start to end."""

    catalog: Catalog
    model: ModelBundle | None
    model_error: str | None
    shadow: ModelBundle | None
    experiment: Experiment | None = None  # the live experiment, only while its challenger is loaded
    challenger: ModelBundle | None = None


def _file_key(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def load_bundle(registry_spec: str, catalog: Catalog, version: str | None = None) -> ModelBundle:
    """Return the model version `version` (else the pinned or current one) compiled for `catalog`.

    Raises models.registry.ModelLoadError with a sentence saying why it cannot serve.
    """
    from models.features import Featurizer
    from models.registry import ModelLoadError, Registry
    from models.scoring import Scorer

    registry, pinned = Registry.parse(registry_spec)
    v = version or pinned or registry.current()
    if v is None:
        raise ModelLoadError(f"the model registry {registry.root} has no current version")
    loaded = registry.load(v)
    featurizer = Featurizer(loaded.schema, catalog.products, catalog.messages)
    scorer = Scorer(loaded)
    return ModelBundle(loaded.version, featurizer, scorer, loaded.schema.sha256())


def current_pointer(registry_spec: str) -> str | None:
    """Return the version the registry's `current` pointer names (the pinned one for DIR@VERSION).

    A pin may be an alias: ``DIR@current`` follows promotions, ``DIR@latest`` the newest version written.
    """
    from models.registry import Registry

    registry, pinned = Registry.parse(registry_spec)
    return registry.resolve(pinned) if pinned else registry.current()


def start_experiment(
    registry_root: str, challenger: str, share: float | None = None, experiment_id: str | None = None
) -> Experiment:
    """Return the registry's experiment after ``--challenger``: written there unless it is already known.

    ``challenger``: a version id, or ``latest`` / ``current``; the id defaults to ``exp-<version>`` so that
    replicas started with the same flags agree; ``share`` defaults to 0.5. The registry's file wins over
    the flags for an experiment it already holds: a share changed by ``retention experiment share`` is
    kept, and an experiment that was stopped (or promoted) stays stopped (a warning says so; start a new
    one with a new ``--experiment-id``). Raises ExperimentError (one sentence) when the version does not
    exist or is the current one, or another experiment is running.
    """
    import time

    from models.registry import Registry, RegistryError

    registry = Registry(registry_root)
    try:
        version = registry.resolve(challenger)
    except RegistryError as exc:
        raise ExperimentError(f"--challenger {challenger}: {exc}") from None
    if version not in registry.versions():
        raise ExperimentError(f"--challenger {challenger}: no such version in the model registry {registry.root}")
    if version == registry.current():
        raise ExperimentError(f"--challenger {version} is the current version: a challenger must differ from it")
    eid = experiment_id or f"exp-{version}"
    running = read_experiment(registry.root)
    if running is not None and running.experiment_id == eid:
        if running.challenger != version:
            raise ExperimentError(f"experiment {eid} has challenger {running.challenger}, not {version}: "
                                  "give another --experiment-id")
        if not running.active:
            log.warning("experiment %s was stopped: serving without it (--challenger ignored; start a new one with "
                        "another --experiment-id)", eid)
        elif share is not None and share != running.share:
            log.warning("experiment %s runs at share %g (set in the registry); --challenger-share %g ignored",
                        eid, running.share, share)
        return running
    if running is not None and running.active:
        raise ExperimentError(
            f"experiment {running.experiment_id} (challenger {running.challenger}, share {running.share:g}) is running "
            f"in {registry.root}; stop it first (retention experiment stop) or serve without --challenger"
        )
    wanted = Experiment(eid, version, 0.5 if share is None else share, True, int(time.time() * 1000))
    write_experiment(registry.root, wanted)
    log.info("started experiment %s: challenger %s on %.0f%% of subscribers", eid, version, 100 * wanted.share)
    return wanted


class Runtime:
    """Holds the live :class:`Snapshot` and reloads it when the catalog file or current model changes."""

    def __init__(
        self,
        *,
        catalog_path: str,
        registry_spec: str,
        environment: str | None = None,
        shadow_version: str | None = None,
        challenger: str | None = None,
        challenger_share: float | None = None,
        experiment_id: str | None = None,
        on_reload_failure: Callable[[str, str], None] | None = None,
        on_model_version: Callable[[str | None], None] | None = None,
    ) -> None:
        self.catalog_path = catalog_path
        self.environment = environment  # Apple's, whose approved texts the catalog answers
        self.registry_spec = registry_spec
        self.shadow_version = shadow_version
        self.challenger = challenger
        self.challenger_share = challenger_share
        self.experiment_id = experiment_id
        self._experiment_key: tuple[int, int, int] | None = None
        self._on_failure = on_reload_failure or (lambda what, why: None)
        self._on_version = on_model_version or (lambda v: None)
        self._lock = threading.Lock()
        self._catalog_key: tuple[int, int, int] | None = None
        self._model_pointer: str | None = None
        self.snapshot: Snapshot | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- loading ------------------------------------------------------------------
    def load(self) -> Snapshot:
        """Load the catalog (required) and the model (optional: without one the rule policy serves); return the snapshot.

        Raises models.catalog.CatalogError, naming the entry and the rule it breaks, when the catalog cannot
        be loaded; a model that cannot be loaded raises nothing: the snapshot has no model and says why.
        """
        catalog = Catalog.load(self.catalog_path, self.environment)
        self._catalog_key = _file_key(self.catalog_path)
        model, error = self._try_model(catalog)
        shadow = self._try_shadow(catalog)
        if self.challenger:
            self._start_experiment()
        experiment, challenger = self._try_experiment(catalog)
        snap = Snapshot(catalog, model, error, shadow, experiment, challenger)
        self.snapshot = snap
        self._on_version(model.version if model else None)
        if error:
            log.warning("serving without a model (rule policy, not ready): %s", error)
        return snap

    def _try_model(self, catalog: Catalog) -> tuple[ModelBundle | None, str | None]:
        try:
            self._model_pointer = current_pointer(self.registry_spec)
            return load_bundle(self.registry_spec, catalog), None
        except Exception as exc:  # a bad model must never stop the server: it serves the rules
            return None, str(exc) or type(exc).__name__

    def _try_shadow(self, catalog: Catalog) -> ModelBundle | None:
        if not self.shadow_version:
            return None
        try:
            return load_bundle(self.registry_spec.split("@", 1)[0], catalog, self.shadow_version)
        except Exception as exc:
            log.warning("shadow model %s not loaded: %s", self.shadow_version, exc)
            self._on_failure("shadow", str(exc))
            return None

    @property
    def _registry_root(self) -> str:
        return self.registry_spec.split("@", 1)[0]

    def _start_experiment(self) -> None:
        assert self.challenger
        start_experiment(self._registry_root, self.challenger, self.challenger_share, self.experiment_id)

    def _try_experiment(self, catalog: Catalog) -> tuple[Experiment | None, ModelBundle | None]:
        """Return the registry's active experiment and its loaded challenger, or (None, None).

        A file that cannot be used, or a challenger that does not load, leaves every subscriber on the
        current model, with a log line and a reload-failure metric.
        """
        from models.experiment import EXPERIMENT_FILE

        self._experiment_key = _file_key(os.path.join(self._registry_root, EXPERIMENT_FILE))
        try:
            experiment = read_experiment(self._registry_root)
        except ExperimentError as exc:
            log.error("experiment refused, every subscriber gets the current model: %s", exc)
            self._on_failure("experiment", str(exc))
            return None, None
        if experiment is None or not experiment.active:
            return None, None
        if experiment.challenger == self._model_pointer:
            log.warning("experiment %s: its challenger %s is now the current version, so both arms would get the same "
                        "model; serving without the experiment (retention experiment stop ends it)",
                        experiment.experiment_id, experiment.challenger)
            return None, None
        try:
            challenger = load_bundle(self._registry_root, catalog, experiment.challenger)
        except Exception as exc:
            log.error("experiment %s: challenger %s not loaded, every subscriber gets the current model: %s",
                      experiment.experiment_id, experiment.challenger, exc)
            self._on_failure("challenger", str(exc))
            return None, None
        return experiment, challenger

    # ---- reloading ----------------------------------------------------------------
    def check_reload(self) -> bool:
        """Reload what changed on disk; return True when a new snapshot was installed."""
        with self._lock:
            old = self.snapshot
            assert old is not None
            catalog = old.catalog
            catalog_changed = False
            key = _file_key(self.catalog_path)
            if key != self._catalog_key:
                self._catalog_key = key
                try:
                    new_cat = Catalog.load(self.catalog_path, self.environment)
                    content = content_problems(new_cat, Path(self.catalog_path).resolve().parent)
                    if content:  # what serve's start refuses, a reload refuses too
                        raise CatalogError(f"{len(content)} problem(s) with Apple's limits, the first: {content[0]}")
                except CatalogError as exc:
                    log.error("catalog reload refused, the old catalog keeps serving: %s", exc)
                    self._on_failure("catalog", str(exc))
                else:
                    catalog_changed = new_cat.sha256 != catalog.sha256
                    catalog = new_cat
            try:
                pointer = current_pointer(self.registry_spec)
            except Exception as exc:
                pointer = self._model_pointer
                log.error("model registry unreadable: %s", exc)
            from models.experiment import EXPERIMENT_FILE

            experiment_changed = (
                _file_key(os.path.join(self._registry_root, EXPERIMENT_FILE)) != self._experiment_key
            )
            model, error = old.model, old.model_error
            model_changed = pointer != self._model_pointer or (old.model is None and pointer is not None)
            if model_changed or catalog_changed:
                try:
                    if pointer is None:
                        raise ValueError("the model registry has no current version")
                    model = load_bundle(self.registry_spec, catalog, pointer)
                    error = None
                    self._model_pointer = pointer
                except Exception as exc:
                    if model_changed:
                        self._model_pointer = pointer  # don't retry a broken version every tick
                        log.error("model version %s refused, %s keeps serving: %s", pointer,
                                  old.model.version if old.model else "the rule policy", exc)
                        self._on_failure("model", str(exc))
                    elif old.model is not None:
                        # the new catalog broke the old model's featurizer: refuse the catalog instead
                        log.error("catalog refused: the model cannot featurize it: %s", exc)
                        self._on_failure("catalog", str(exc))
                        return False
            if not (model_changed or catalog_changed or experiment_changed):
                return False
            shadow = old.shadow
            if catalog_changed and self.shadow_version:
                shadow = self._try_shadow(catalog)
            experiment, challenger = old.experiment, old.challenger
            if catalog_changed or experiment_changed or model_changed:
                experiment, challenger = self._try_experiment(catalog)
                if experiment_changed:
                    log.info("experiment: %s", f"{experiment.experiment_id}, challenger {experiment.challenger} on "
                             f"{experiment.share:.0%} of subscribers" if experiment else "none (current model for all)")
            self.snapshot = Snapshot(catalog, model, error, shadow, experiment, challenger)
            self._on_version(model.version if model else None)
            log.info("reloaded: catalog %s, model %s", catalog.sha256[:12], model.version if model else None)
            return True

    def start(self, interval_s: float) -> None:
        """Start the background thread that checks for changes every `interval_s` seconds."""
        if interval_s <= 0 or self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.check_reload()
                except Exception:  # never let the reloader die
                    log.exception("reload check failed")

        self._thread = threading.Thread(target=loop, name="retention-reload", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the reload thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

