"""Hook specifications: the plugin author's reference.

A plugin is a module (or object) with functions decorated by `sagellm_core.hookimpl` whose names are
hook names below. It is found through the entry-point group `sagellm.plugins`:

    [project.entry-points."sagellm.plugins"]
    my_scheduler = "my_package.plugin"

Every hook is a *registration* hook: it receives a `register` callback and calls it once per thing it
provides. Hooks run once at start-up; the engine's per-step loop calls the registered objects
directly, never through pluggy.

Compatibility: an implementation may accept any subset of a hook's arguments, so hooks can gain
arguments later without breaking plugins. A plugin module may declare the plugin-API range it
supports as `SAGELLM_PLUGIN_API = ">=1.0,<2"`; outside that range it is refused at load time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol

import pluggy

if TYPE_CHECKING:
    from sagellm_core.backend import BackendSpec
    from sagellm_core.config import EngineConfig

PROJECT_NAME = "sagellm"
ENTRY_POINT_GROUP = "sagellm.plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class Register(Protocol):
    """The ``register`` callback of the scheduler, KV-policy and metric hooks.

    ``options``: an attrs class; the user's option mapping for this name is structured into it
    (validators in `sagellm_core.options`; errors name the config path) before any model loads,
    and the instance is passed to ``factory``.
    """

    def __call__(self, name: str, factory: Callable[..., Any], options: type | None = None) -> None: ...


class RegisterBackend(Protocol):
    """The ``register`` callback of `sagellm_register_backends`."""

    def __call__(self, spec: BackendSpec) -> None: ...


@hookspec
def sagellm_register_backends(register: RegisterBackend) -> None:
    """Register device backends.

    Call ``register(spec)`` with a `sagellm_core.backend.BackendSpec`: a name, a selection priority
    (higher wins when several devices are present), a ``probe()`` that answers whether the device is
    here *without initialising it*, a ``create(config)`` factory returning a
    `sagellm_core.backend.Backend` (``create(config, options)`` when the spec names an ``options``
    attrs class for ``backend.options``). `Backend` is an abstract contract: a backend implements
    ``device``, ``default_dtype``, ``memory_info``, ``attention_op`` and ``synchronize``; the rest
    have generic defaults. Template: ``plugins/sagellm-backend-template``.
    """


@hookspec
def sagellm_register_kv_policies(register: Register) -> None:
    """Register KV-cache policies.

    Call ``register(name, factory, options=OptionsClass)``. ``factory(options)`` returns a
    `sagellm_core.kv.policy.KVPolicy` (one per KV pool): it decides which requests take part in
    prefix reuse (``should_cache(request)``), block hashing, and the eviction order of free blocks.
    Most policies subclass `sagellm_core.kv.policy.FreeQueuePolicy` and override ``pick_victim``.
    ``options`` is an optional attrs class the user's ``kv_cache.policy_options`` mapping is
    validated against. Template: ``plugins/sagellm-kv-mru``.
    """


@hookspec
def sagellm_register_kv_tiers(register: Register) -> None:
    """Register KV tiers: stores below the device KV pool (host memory, disk, remote, ...).

    Call ``register(name, factory, options=OptionsClass)``. ``factory(context)`` — or
    ``factory(context, options)`` with an options class, validated against
    ``kv_tiers.options.<name>`` — returns a `sagellm_core.kv.tiers.base.KVTier`: a store of full KV
    blocks keyed by their salted chained hash (16 bytes of blake2b over the parent's key and the
    block's tokens), each stored with the token ids it caches. ``context`` is a
    `sagellm_core.kv.tiers.base.TierContext`: the shape of one block as uint8, the device, the
    fingerprint of the model and KV layout (a persistent tier keeps fingerprints apart) and the
    `KVTiersConfig`. A tier implements ``contains``, ``get`` (None for a missing or unreadable
    block: the engine recomputes it), ``put``, ``has_room``, ``victim``, ``evict``, ``keys``; blocks
    a full tier gives up move to the next tier down. The built-in ``host`` and ``disk`` tiers are
    registered through this hook (`sagellm_core.builtin.kv_tiers`); ``kv_tiers.extra`` selects
    plugin tiers, below them.
    """


@hookspec
def sagellm_register_schedulers(register: Register) -> None:
    """Register schedulers.

    Call ``register(name, factory, options=OptionsClass)``. ``factory(scheduler_config, options)``
    returns a `sagellm_core.schedulers.base.Scheduler`. Most plugins subclass
    `sagellm_core.schedulers.base.PolicyScheduler` and override ``waiting_key`` (which waiting
    request is admitted first) and/or ``preemption_victim``. ``options`` is an optional attrs class
    the user's ``scheduler.options`` mapping is validated against. Template: ``plugins/sagellm-sched-spf``.
    """


@hookspec
def sagellm_register_metrics(register: Register) -> None:
    """Register metric consumers.

    Call ``register(name, factory)`` or ``register(name, factory, options=OptionsClass)``.
    ``factory(metrics_config)`` — ``factory(metrics_config, options)`` when an options class was
    registered; the user's ``metrics.options.<name>`` mapping is validated against it — returns an
    object with ``on_step(event: StepEvent)``, ``on_request_finished(event: RequestEvent)`` and
    ``snapshot() -> dict`` (see `sagellm_core.metrics.base.MetricSink`). Events arrive once per
    engine step and once per finished request. Template: ``plugins/sagellm-metric-jsonl``.
    """


@hookspec(historic=True)
def sagellm_configure(config: EngineConfig) -> None:
    """Called once with the final `EngineConfig` when an engine starts (historic: late plugins see it too).

    Use it to read configuration; do not mutate it (it is frozen).
    """


@hookspec
def sagellm_register_commands(register: Callable[..., None]) -> None:
    """Register sub-commands of the ``sagellm`` command line (as simonw/llm's ``register_commands``).

    Call ``register(name, add_arguments, run, help="one line for sagellm --help")``. The CLI creates
    the argparse sub-parser ``sagellm <name>``, hands it to ``add_arguments(parser)`` to declare the
    command's options (and nested sub-commands, if any), and when the user runs the command calls
    ``run(args)`` with the parsed `argparse.Namespace`; ``run`` returns the exit status (None means 0)
    and raises `sagellm_core.errors.SageLLMError` for an error the user should read (exit status 2).
    A command that builds an engine adds the shared engine options with
    `sagellm_core.cli.common.add_engine_options` and turns them into an `EngineConfig` with
    `sagellm_core.cli.common.engine_config`. ``args.argv`` holds the command line as typed.

    ``name`` is lower-case letters, digits and dashes. A name taken by a built-in command is refused
    with a warning; two plugins registering one name is a clash (the later plugin is marked failed).
    The hook runs every time ``sagellm`` starts: import heavy modules inside ``run``, not at the top
    of the plugin module. See `sagellm_core.commands.CommandSpec`.
    """
