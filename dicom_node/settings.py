"""One typed settings object, read from ``anatomix-node.toml`` with ``ANATOMIX_...`` overrides.

Validated once at start-up: a bad value fails fast with a :class:`SettingsError` naming the key and
the value. No module globals: callers pass the :class:`Settings` they loaded.

Environment overrides are ``ANATOMIX_<SECTION>_<KEY>`` (upper case), e.g. ``ANATOMIX_NODE_PORT=11113``
or ``ANATOMIX_DATABASE_URL=postgresql://127.0.0.1/anatomix``. Lists are comma separated.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from dicom_node.store.base import FINAL_STUDY_STATES
from inference.result import APM_BACKENDS
from inference.tasks import TaskError, TaskRequest
from sr_writer.kinds import SEND_ORDER, SR_ANATOMY_MODES
from sr_writer.uids import check_uid_root

CONFIG_FILE_NAME = "anatomix-node.toml"
ENV_PREFIX = "ANATOMIX_"
#: A system install (FHS), as deploy/systemd expects it: the config in /etc, the data in /var/lib.
SYSTEM_CONFIG_DIR = Path("/etc/anatomix")
SYSTEM_DATA_DIR = Path("/var/lib/anatomix")

#: Result object kinds that sr_writer can build (its kinds table, in send order); profiles are subsets.
OBJECT_KINDS = SEND_ORDER
#: ``model.cpu_precision`` values: inference.lm.cpu_precision.CPU_PRECISIONS (not imported: it loads
#: torch; tests/inference/test_cpu_precision.py checks the two agree).
CPU_PRECISIONS = ("fp32", "bf16", "int8")
#: Study states a retention policy may purge: the final ones (work in progress never is).
RETENTION_STATES = tuple(state for state in FINAL_STUDY_STATES if state != "purged")

DEFAULT_PROFILES: dict[str, tuple[str, ...]] = {
    "full": ("sr", "text_sr", "seg", "gsps", "sc"),
    "pacs-basic": ("gsps", "text_sr", "sc"),
    "ohif": ("sr", "seg"),
    "sr-only": ("sr", "text_sr"),
}

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars, no backslash


class SettingsError(ValueError):
    """A setting has a bad value; the message names the key, the value and what is allowed."""


@dataclass(frozen=True)
class NodeSettings:
    """The DICOM port: who we are and where senders reach us."""

    #: Our AE title (1-16 characters). Senders must call it; results are sent with it as calling AE.
    ae_title: str = "ANATOMIX"
    #: DICOM port we listen on.
    port: int = 11112
    #: Loopback by default: a site opens the port to its network on purpose (``0.0.0.0`` = every interface).
    bind_address: str = "127.0.0.1"
    #: Largest PDU we accept; 0 means unlimited.
    max_pdu: int = 131072
    #: Demo only: accept associations from any calling AE (otherwise add sources with ``anatomix-node ae add``).
    accept_unknown_sources: bool = False
    #: Number of SCP processes sharing the listening socket (ingest scales with processes).
    scp_processes: int = 1
    #: Seconds a peer may stay silent inside an association before we abort it.
    network_timeout_s: float = 60.0


@dataclass(frozen=True)
class StorageSettings:
    """Where the node keeps what it receives and produces, and for how long."""

    #: Root of everything the node writes: spool, embedded database, results, broker files.
    #: A relative path is relative to this file.
    data_dir: Path = Path("var")
    #: Answer 0xA700 (out of resources) when the spool's file system has less free space than this.
    min_free_bytes: int = 512 * 1024 * 1024
    #: Retention: remove a study's received images, results and rows this many days after it
    #: reached one of ``retention_states`` and stayed unchanged (a tombstone row remains, and a
    #: late instance reopens it). 0 keeps everything (the default: deleting is the admin's choice).
    retention_days: float = 0.0
    #: Study states the retention policy may purge: ``done``, and ``failed`` if wanted (e.g. ["done", "failed"]).
    retention_states: tuple[str, ...] = ("done",)

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"


@dataclass(frozen=True)
class DatabaseSettings:
    """The state store."""

    #: ``sqlite:///path/to/file.db`` or ``postgresql://host:port/dbname``
    #: (production, e.g. "postgresql://anatomix@db-host:5432/anatomix").
    #: Empty means SQLite in ``<data_dir>/anatomix.db``.
    url: str = ""


@dataclass(frozen=True)
class QueueSettings:
    """The task queue between the node and its analyze and deliver workers."""

    #: Celery broker. Empty means the embedded local transport (no server needed);
    #: ``redis://127.0.0.1:6379/0`` in production.
    broker_url: str = ""
    #: Seconds before the broker redelivers an unacknowledged task (must exceed the task time limit).
    visibility_timeout_s: int = 3600
    #: Seconds one analysis (all images of a study) may take before its worker is stopped.
    analyze_time_limit_s: int = 1800
    #: Seconds one delivery task may take before its worker is stopped.
    deliver_time_limit_s: int = 600
    #: Seconds a worker's claim on a study lasts without a heartbeat; after that the node's dispatch
    #: loop re-queues the work (a worker that died, a broker that lost its messages).
    lease_s: float = 60.0
    #: How often the dispatch loop looks for stable studies and for work the broker lost.
    dispatch_interval_s: float = 2.0


@dataclass(frozen=True)
class AssemblySettings:
    """When a study is complete enough to analyse."""

    #: A study is stable when no instance arrived for this many seconds (per source: ``ae add --quiet-period``).
    quiet_period_s: float = 10.0
    #: A study still receiving after this long is closed anyway.
    hard_cap_s: float = 600.0
    #: How often (seconds) the node looks for studies that became stable.
    poll_interval_s: float = 1.0


@dataclass(frozen=True)
class ModelSettings:
    """The AnatomiX model and how the analyze workers run it."""

    #: Directory holding the APM .pth, lm.pt, the MedGemma base and the retrieval DB (e.g. "/srv/anatomix/model").
    dir: Path | None = None
    #: Generate (once, cached under data_dir) and use tiny demo weights; every result made with them says so.
    demo_weights: bool = False
    #: ``torch``, ``onnxruntime`` (APM) or ``tensorrt`` (APM).
    backend: str = "torch"
    #: ``cpu``, ``cuda`` or ``cuda:N``.
    device: str = "cpu"
    #: What the model does per image: task names, or ``name:argument``
    #: (e.g. "vqa:Is there a pleural effusion?"; the names are ``inference.result.TASKS``).
    tasks: tuple[str, ...] = ("report", "anatomy_grounding", "abnormality_detection")
    #: Longest answer the language model may generate, in tokens.
    max_new_tokens: int = 350
    #: Stop at <end_of_turn>/<eos> (fast) instead of always decoding max_new_tokens like the reference.
    stop_at_end_of_turn: bool = True
    # -- engine exactness and cross-study batching (issue 12) --
    #: ``empty`` (the reference's benchmark and string entry point: the published figures) or
    #: ``training`` (the system prompt the model was fine-tuned with).
    system_prompt: str = "empty"
    #: Images decoded together by one analyze worker, taken across queued studies (1: one study at a time).
    max_batch: int = 1
    #: How long an idle worker waits for more queued studies to fill a batch before it starts.
    batch_wait_ms: int = 50
    #: How the language model's weights are held on a CPU: ``fp32`` (exact), ``bf16`` or ``int8``
    #: (weight-only; the fastest decode). Ignored on CUDA, which always runs bf16.
    cpu_precision: str = "fp32"
    #: Torch threads of a CPU worker with bf16/int8: 0 = the cores its affinity mask allows. On a
    #: shared, oversubscribed VM 1 decodes several times faster (OpenMP threads wait for each other).
    cpu_threads: int = 0


@dataclass(frozen=True)
class OutputSettings:
    """What the node produces: object kinds per destination profile (docs/configuration.md: "Output profiles")."""

    #: UID root for everything we create (digits and dots, ending in a dot; deterministic UIDs hang under it).
    uid_root: str = "1.2.826.0.1.3680043.10.1431."
    #: Profile of a destination without its own: a built-in profile or one of ``profiles``.
    default_profile: str = "full"
    #: Institution Name written into every result object (empty: none).
    institution_name: str = ""
    #: Regions in the TID 1500 SR besides the findings: "findings" (none: a viewer draws the findings
    #: only), "grounded" (those a finding is grounded to) or "all" (every located region).
    sr_anatomy: str = "findings"
    #: Named profiles: name -> object kinds, merged over the built-in ones
    #: (e.g. profiles = { my-pacs = ["gsps", "text_sr"] }).
    profiles: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def profile(self, name: str) -> tuple[str, ...]:
        merged = {**DEFAULT_PROFILES, **self.profiles}
        try:
            return merged[name]
        except KeyError:
            raise SettingsError(f"unknown output profile {name!r}; known profiles: {', '.join(sorted(merged))}") from None


@dataclass(frozen=True)
class DeliverySettings:
    """Sending results to destinations: retries with capped exponential backoff, then dead letters."""

    #: An extra cap on tries per destination; the retry window below is what normally ends retrying.
    max_attempts: int = 1000
    #: Seconds before the first retry; each further retry waits twice as long (with jitter).
    backoff_base_s: float = 2.0
    #: Retries back off exponentially (with jitter) up to this many seconds between tries.
    backoff_max_s: float = 300.0
    #: Seconds to wait for an association / a DIMSE response from a destination.
    timeout_s: float = 30.0
    # ---- retry window (per destination) ----
    #: A destination that stays unreachable is retried for this long from its first attempt, then
    #: its objects are dead-lettered (re-sendable with ``resend``). Other destinations are unaffected.
    retry_window_s: float = 86400.0


@dataclass(frozen=True)
class LoggingSettings:
    """Log level and the optional audit file."""

    #: DEBUG, INFO, WARNING or ERROR.
    level: str = "INFO"
    #: Append-only audit trail (JSON lines) in addition to the database's audit table; empty = none.
    audit_file: str = ""


@dataclass(frozen=True)
class LimitsSettings:
    """What a client may cost the DICOM port before and after it is identified (per SCP process).

    See docs/security.md, "Limits on the DICOM port", for how they interact.
    """

    #: Seconds from TCP accept until a complete A-ASSOCIATE-RQ must have arrived; else the socket is closed.
    establish_timeout_s: float = 10.0
    #: Concurrent TCP connections per SCP process (pending and associated together).
    max_connections: int = 64
    #: Of ``max_connections``, slots only hosts of configured sources (and ``trusted_hosts``) may use.
    reserved_connections: int = 16
    #: Concurrent connections from one host that is not a configured source.
    max_connections_per_host: int = 8
    #: Extra hosts or networks (``10.1.2.3``, ``10.1.0.0/16``) that get reserved slots and no per-host limit.
    trusted_hosts: tuple[str, ...] = ()
    #: Largest A-ASSOCIATE-RQ (and any other non-data PDU) accepted, in bytes; larger ones get A-ABORT.
    max_associate_rq_bytes: int = 65536
    #: Largest DIMSE message (command or data set) received in one association, in bytes; larger: A-ABORT.
    max_message_bytes: int = 2 * 1024**3
    #: Connection-level events and repeated rejections are summarised once per window (seconds).
    audit_window_s: float = 60.0
    #: Rejected associations recorded one by one per host and window; the rest go into one summary row.
    audit_rejections_per_host: int = 5
    #: Hosts named individually in one window's summaries, the costliest first; the rest are counted together.
    audit_hosts_per_window: int = 50
    #: A host whose cost in a window reaches this (one unit per connection event or rejection, per second
    #: a connection held a slot before association, per 64 KiB sent before it) gets its summary written
    #: at once and is named whatever the window's budget.
    audit_host_threshold: float = 100.0
    #: Audit rows older than this many days are deleted (0 keeps them all).
    audit_retention_days: int = 0
    #: Longest an idle association's loops sleep between checks (pynetdicom polls every 1 ms).
    idle_poll_s: float = 0.05


@dataclass(frozen=True)
class HttpSettings:
    """The operations API (``dicom_node.api``), served by ``serve`` in its own process."""

    #: TCP port of the HTTP API; 0 = no HTTP service.
    port: int = 8080
    #: Loopback by default: put a TLS-terminating reverse proxy in front to reach it from elsewhere.
    bind_address: str = "127.0.0.1"
    #: Console sessions end this long after login.
    session_ttl_s: float = 8 * 3600.0
    #: Failed logins per user name (and per client address) within login_window_s before 429.
    max_failed_logins: int = 5
    #: Seconds over which failed logins are counted.
    login_window_s: float = 300.0
    #: Mark the session cookie Secure (set when a TLS proxy fronts the API).
    secure_cookies: bool = False
    #: /readyz fails when the spool disk has less free space than this (default: storage.min_free_bytes).
    readiness_min_free_bytes: int = -1
    #: The web console shows times in this IANA time zone (e.g. "Europe/Berlin").
    time_zone: str = "UTC"
    #: A file holding the token /metrics then requires (``Authorization: Bearer <token>``); unset: open.
    #: Read at each scrape, so it can be replaced without a restart.
    metrics_token_file: Path | None = None
    #: /readyz needs a worker report of a loaded model at most this old; workers report every third of it.
    worker_report_max_age_s: float = 90.0
    #: OHIF's address as a browser reaches it (e.g. "https://pacs-node.example.org/ohif" or "/ohif"): the console then
    #: links each study to OHIF's viewer. OHIF's DICOMweb data source is this node's /dicomweb, on the same origin (a
    #: reverse proxy), so the console session is OHIF's credential (docs/admin-guide.md, "Viewing studies in OHIF").
    #: Empty: no links.
    ohif_url: str = ""
    #: Largest STOW-RS request body, in bytes (a larger study is sent in several requests); one
    #: instance is capped by ``limits.max_message_bytes`` as on the DICOM port. Refused with 413.
    stow_max_request_bytes: int = 1024**3


@dataclass(frozen=True)
class AuditSettings:
    """Forwarding of the audit trail to an ATNA audit record repository (syslog, RFC 5424).

    Empty ``syslog_host`` = no forwarding. Events are spooled in the state store and sent by a
    thread of ``serve``: a repository that is down delays them, never C-STORE, and loses none.
    Retention of the trail itself is ``limits.audit_retention_days`` (unforwarded events are kept).
    """

    #: Host of the audit record repository (e.g. "audit.hospital.example"); empty = no forwarding.
    syslog_host: str = ""
    #: 0 = the transport's registered port (6514 for tls, 601 for tcp).
    syslog_port: int = 0
    #: ``tcp`` (RFC 6587 octet counting) or ``tls`` (RFC 5425).
    transport: str = "tls"
    #: TLS: CA bundle that signs the repository's certificate (empty = the system's).
    ca_file: str = ""
    #: TLS: client certificate (PEM), if the repository asks for one; goes with ``key_file``.
    cert_file: str = ""
    #: TLS: the client certificate's private key (PEM).
    key_file: str = ""
    #: RFC 5424 APP-NAME.
    app_name: str = "anatomix-node"
    #: The DICOM AuditSourceID (empty = node.ae_title).
    audit_source_id: str = ""
    #: AuditEnterpriseSiteID (e.g. the hospital's identifier); empty = not sent.
    enterprise_site_id: str = ""
    #: Events per connection.
    batch_size: int = 200
    #: Retry back-off after a failure grows to this many seconds.
    retry_max_s: float = 60.0
    #: Seconds to wait for the repository to connect / confirm a batch.
    timeout_s: float = 10.0


@dataclass(frozen=True)
class TlsSettings:
    """DICOM TLS for the SCP (PS3.15 Annex B, BCP 195): a TLS port beside (or instead of) ``node.port``.

    See docs/security.md, "DICOM TLS". Per remote node TLS (as SCU) is set with ``ae add --tls``.
    """

    #: Listen for DICOM over TLS.
    enabled: bool = False
    #: The TLS port (2762 is DICOM's registered port for DICOM over TLS).
    port: int = 2762
    #: Also listen without TLS on ``node.port`` (false: TLS only).
    plain_port: bool = True
    #: PEM certificate (chain) presented to every client (e.g. "/etc/anatomix/tls/node.crt").
    certificate: Path | None = None
    #: The certificate's PEM private key (e.g. "/etc/anatomix/tls/node.key").
    private_key: Path | None = None
    #: PEM file of the CAs whose client certificates are trusted (e.g. "/etc/anatomix/tls/clients-ca.crt").
    ca_certificates: Path | None = None
    #: Refuse clients that present no certificate signed by ``ca_certificates`` (false: optional).
    require_client_certificate: bool = True
    #: Lowest protocol version: TLSv1.2 or TLSv1.3 (BCP 195 forbids anything older).
    min_version: str = "TLSv1.2"
    #: OpenSSL cipher list for TLS 1.2 (BCP 195 / RFC 9325: forward-secret AEAD suites only).
    ciphers: str = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"
    #: ``tls status`` and the start-up log warn when a certificate expires within this many days.
    expiry_warning_days: int = 30


@dataclass(frozen=True)
class Settings:
    node: NodeSettings = field(default_factory=NodeSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    assembly: AssemblySettings = field(default_factory=AssemblySettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    #: Where the settings came from (a file path or "defaults"), for messages.
    source: str = "defaults"

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{(self.storage.data_dir / 'anatomix.db').resolve()}"

    @property
    def embedded(self) -> bool:
        """True when no external service is configured (SQLite and the local Celery transport)."""
        return not self.queue.broker_url

    def with_overrides(self, **sections: dict[str, Any]) -> Settings:
        """Return a copy with some keys replaced, e.g. ``with_overrides(node={"port": 1})``; validated."""
        updated = self
        for section, values in sections.items():
            current = getattr(updated, section)
            updated = replace(updated, **{section: _coerce_section(section, type(current), {**_as_dict(current), **values})})
        validate(updated)
        return updated


# ---- loading ---------------------------------------------------------------------------------------


def find_config_file(explicit: str | Path | None, cwd: Path | None = None, system_dir: Path = SYSTEM_CONFIG_DIR) -> Path | None:
    """The config file to read: the explicit one (must exist), else ./anatomix-node.toml, else the
    system install's /etc/anatomix/anatomix-node.toml, if present."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise SettingsError(f"config file {str(path)!r} does not exist")
        return path
    for candidate in ((cwd or Path.cwd()) / CONFIG_FILE_NAME, system_dir / CONFIG_FILE_NAME):
        if candidate.is_file():
            return candidate
    return None


def load_settings(path: str | Path | None = None, env: dict[str, str] | None = None) -> Settings:
    """Read TOML (optional), apply ``ANATOMIX_*`` environment overrides, validate, return Settings."""
    env = dict(os.environ if env is None else env)
    config_path = find_config_file(path)
    raw: dict[str, Any] = {}
    if config_path is not None:
        try:
            raw = tomllib.loads(config_path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"{config_path}: not valid TOML: {exc}") from None
    _apply_env(raw, env)
    settings = _build(raw, source=str(config_path) if config_path else "defaults")
    if config_path is not None and not settings.storage.data_dir.is_absolute():
        # Relative data_dir is relative to the config file, so the node finds its data from anywhere.
        settings = replace(settings, storage=replace(settings.storage, data_dir=config_path.parent.resolve() / settings.storage.data_dir))
    validate(settings)
    return settings


def section_types() -> dict[str, type]:
    """Section name -> its settings dataclass, in file order (``source`` is bookkeeping, not a section)."""
    hints = get_type_hints(Settings)
    return {f.name: hints[f.name] for f in fields(Settings) if f.name != "source"}


def _apply_env(raw: dict[str, Any], env: dict[str, str]) -> None:
    sections = section_types()
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        rest = key[len(ENV_PREFIX) :].lower()
        section, _, name = rest.partition("_")
        if section not in sections or not name:
            continue  # other ANATOMIX_* variables (e.g. for tests) are not settings
        known = {f.name for f in fields(sections[section])}
        if name not in known:
            raise SettingsError(f"environment variable {key}: {section!r} has no setting {name!r}; known: {', '.join(sorted(known))}")
        raw.setdefault(section, {})[name] = value


def _build(raw: dict[str, Any], source: str) -> Settings:
    sections = section_types()
    unknown = set(raw) - set(sections)
    if unknown:
        raise SettingsError(f"{source}: unknown section(s) {', '.join(sorted(unknown))}; known: {', '.join(sections)}")
    built: dict[str, Any] = {}
    for name, cls in sections.items():
        values = raw.get(name, {})
        if not isinstance(values, dict):
            raise SettingsError(f"{source}: [{name}] must be a table, got {values!r}")
        built[name] = _coerce_section(name, cls, values)
    return Settings(**built, source=source)


def _as_dict(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def _coerce_section(section: str, cls: type, values: dict[str, Any]) -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise SettingsError(f"[{section}] unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    kwargs = {key: _coerce(f"{section}.{key}", hints[key], value) for key, value in values.items()}
    return cls(**kwargs)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """Convert a TOML or environment value to the annotated type, or raise a SettingsError."""
    origin, args = get_origin(hint), get_args(hint)
    if args and type(None) in args:  # Optional[X]
        if value is None or value == "":
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, inner[0], value)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if hint is int:
            if isinstance(value, bool) or not re.fullmatch(r"\s*[-+]?\d+\s*", str(value)):
                raise ValueError("expected a whole number")
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            try:
                return float(value)
            except ValueError:
                raise ValueError("expected a number") from None
        if hint is str:
            if not isinstance(value, (str, int, float)):
                raise ValueError("expected a string")
            return str(value)
        if hint is Path:
            return Path(str(value)).expanduser()
        if origin is tuple:
            items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
            return tuple(_coerce(key, args[0], item) for item in items)
        if origin is dict:
            if not isinstance(value, dict):
                raise ValueError("expected a table")
            return {str(k): _coerce(f"{key}.{k}", args[1], v) for k, v in value.items()}
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{key} = {value!r}: {exc}") from None
    raise SettingsError(f"{key}: unsupported setting type {hint!r}")  # a bug in this module, not user input


# ---- validation ------------------------------------------------------------------------------------


def validate_ae_title(key: str, value: str) -> None:
    """SettingsError saying what is wrong with an AE title (too long, a backslash, ...) and the rule."""
    if _AE_TITLE.match(value) and value.strip():
        return
    if not value.strip():
        why = "empty or only spaces"
    elif len(value) > 16:
        why = f"{len(value)} characters, at most 16 are allowed: choose a shorter title (nothing is cut off)"
    elif "\\" in value:
        why = "a backslash is not allowed (DICOM uses it to separate values)"
    else:
        bad = next(c for c in value if not " " <= c <= "~")
        why = f"the character {bad!r} is not allowed"
    raise SettingsError(f"{key} = {value!r}: {why} (an AE title is 1-16 printable ASCII characters)")


def _validate_time_zone(name: str) -> None:
    from zoneinfo import ZoneInfo

    try:
        ZoneInfo(name)
    except (ValueError, KeyError, OSError):
        raise SettingsError(f"http.time_zone = {name!r}: not an IANA time zone name (e.g. UTC, Europe/Berlin)") from None


def validate(settings: Settings) -> None:
    """Raise SettingsError naming the first bad key and value."""
    node = settings.node
    validate_ae_title("node.ae_title", node.ae_title)
    if not 0 <= settings.http.port <= 65535:
        raise SettingsError(f"http.port = {settings.http.port}: must be 1-65535, or 0 for no HTTP service")
    if settings.http.max_failed_logins < 1 or settings.http.login_window_s <= 0 or settings.http.session_ttl_s <= 0:
        raise SettingsError("http.max_failed_logins must be >= 1, http.login_window_s and http.session_ttl_s > 0")
    _validate_time_zone(settings.http.time_zone)
    ohif = settings.http.ohif_url
    if ohif and (not re.fullmatch(r"(https?://[^\s/?#]+|)(/[^\s?#]*)?", ohif) or ohif.startswith("//")):
        raise SettingsError(f"http.ohif_url = {ohif!r}: use OHIF's address without a query, e.g. https://node.example.org/ohif or /ohif")
    if settings.http.stow_max_request_bytes < 65536:
        raise SettingsError(f"http.stow_max_request_bytes = {settings.http.stow_max_request_bytes}: must be >= 65536")
    if not 3 <= settings.http.worker_report_max_age_s <= 86400:
        raise SettingsError(f"http.worker_report_max_age_s = {settings.http.worker_report_max_age_s}: must be 3-86400 seconds")
    if not 1 <= node.port <= 65535:
        raise SettingsError(f"node.port = {node.port}: must be 1-65535")
    if node.max_pdu != 0 and node.max_pdu < 4096:
        raise SettingsError(f"node.max_pdu = {node.max_pdu}: must be 0 (unlimited) or at least 4096")
    if not 1 <= node.scp_processes <= 64:
        raise SettingsError(f"node.scp_processes = {node.scp_processes}: must be 1-64")
    if settings.storage.min_free_bytes < 0:
        raise SettingsError(f"storage.min_free_bytes = {settings.storage.min_free_bytes}: must be >= 0")
    if settings.storage.retention_days < 0:
        raise SettingsError(f"storage.retention_days = {settings.storage.retention_days}: must be >= 0 (0 keeps everything)")
    for state in settings.storage.retention_states:
        if state not in RETENTION_STATES:
            raise SettingsError(f"storage.retention_states contains {state!r}: only {' and '.join(RETENTION_STATES)} studies may be purged")
    url = settings.database.url
    if url and not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise SettingsError(f"database.url = {url!r}: use sqlite:///PATH or postgresql://HOST:PORT/DB")
    broker = settings.queue.broker_url
    if broker and not broker.startswith(("redis://", "rediss://", "filesystem://", "memory://")):
        raise SettingsError(f"queue.broker_url = {broker!r}: use redis://HOST:PORT/DB, or leave empty for the embedded transport")
    queue = settings.queue
    if queue.analyze_time_limit_s >= queue.visibility_timeout_s or queue.deliver_time_limit_s >= queue.visibility_timeout_s:
        raise SettingsError(
            f"queue.visibility_timeout_s = {queue.visibility_timeout_s}: must exceed the task time limits "
            f"(analyze {queue.analyze_time_limit_s}, deliver {queue.deliver_time_limit_s}) or tasks run twice"
        )
    if queue.lease_s <= 0 or queue.dispatch_interval_s <= 0:
        raise SettingsError(f"queue.lease_s = {queue.lease_s}, queue.dispatch_interval_s = {queue.dispatch_interval_s}: both must be > 0")
    assembly = settings.assembly
    if assembly.quiet_period_s < 0:
        raise SettingsError(f"assembly.quiet_period_s = {assembly.quiet_period_s}: must be >= 0 seconds")
    if assembly.hard_cap_s < assembly.quiet_period_s:
        raise SettingsError(f"assembly.hard_cap_s = {assembly.hard_cap_s}: must be >= quiet_period_s ({assembly.quiet_period_s}) and both >= 0")
    model = settings.model
    if model.backend not in APM_BACKENDS:
        raise SettingsError(f"model.backend = {model.backend!r}: use {', '.join(APM_BACKENDS[:-1])} or {APM_BACKENDS[-1]}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", model.device):
        raise SettingsError(f"model.device = {model.device!r}: use cpu, cuda or cuda:N")
    if model.max_new_tokens < 1:
        raise SettingsError(f"model.max_new_tokens = {model.max_new_tokens}: must be >= 1")
    if model.system_prompt not in ("empty", "training"):
        raise SettingsError(f"model.system_prompt = {model.system_prompt!r}: use empty (the paper's evaluation) or training")
    if model.cpu_precision not in CPU_PRECISIONS:
        raise SettingsError(f"model.cpu_precision = {model.cpu_precision!r}: use {', '.join(CPU_PRECISIONS[:-1])} or {CPU_PRECISIONS[-1]}")
    if not 0 <= model.cpu_threads <= 1024:
        raise SettingsError(f"model.cpu_threads = {model.cpu_threads}: use 0 (the cores the worker may use) or a thread count")
    if not 1 <= model.max_batch <= 256:
        raise SettingsError(f"model.max_batch = {model.max_batch}: must be between 1 and 256")
    if not 0 <= model.batch_wait_ms <= 60_000:
        raise SettingsError(f"model.batch_wait_ms = {model.batch_wait_ms}: must be between 0 and 60000")
    for task in model.tasks:  # the engine's own parser: "name" or "name:argument"
        try:
            TaskRequest.parse(task)
        except TaskError as exc:
            raise SettingsError(f"model.tasks contains {task!r}: {exc}") from None
    output = settings.output
    try:
        check_uid_root(output.uid_root)  # the rule the writer applies
    except ValueError as exc:
        raise SettingsError(f"output.uid_root = {output.uid_root!r}: {exc}") from None
    for name, kinds in output.profiles.items():
        for kind in kinds:
            if kind not in OBJECT_KINDS:
                raise SettingsError(f"output.profiles.{name} contains {kind!r}; object kinds: {', '.join(OBJECT_KINDS)}")
    if output.sr_anatomy not in SR_ANATOMY_MODES:
        raise SettingsError(f"output.sr_anatomy = {output.sr_anatomy!r}: must be one of {', '.join(SR_ANATOMY_MODES)}")
    if output.default_profile not in {**DEFAULT_PROFILES, **output.profiles}:
        known = ", ".join(sorted({**DEFAULT_PROFILES, **output.profiles}))
        raise SettingsError(f"output.default_profile = {output.default_profile!r}: not a profile; known profiles: {known}")
    if settings.delivery.max_attempts < 1:
        raise SettingsError(f"delivery.max_attempts = {settings.delivery.max_attempts}: must be >= 1")
    if settings.delivery.retry_window_s <= 0 or settings.delivery.backoff_base_s <= 0:
        raise SettingsError(
            f"delivery.retry_window_s = {settings.delivery.retry_window_s}, delivery.backoff_base_s = "
            f"{settings.delivery.backoff_base_s}: both must be > 0 seconds"
        )
    if settings.delivery.backoff_max_s < settings.delivery.backoff_base_s:
        raise SettingsError(f"delivery.backoff_max_s = {settings.delivery.backoff_max_s}: must be >= backoff_base_s")
    validate_limits(settings.limits)
    validate_audit(settings.audit)
    validate_tls(settings.tls, settings.node.port)
    if settings.logging.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise SettingsError(f"logging.level = {settings.logging.level!r}: use DEBUG, INFO, WARNING or ERROR")


def validate_audit(audit: AuditSettings) -> None:
    if audit.transport not in ("tcp", "tls"):
        raise SettingsError(f"audit.transport = {audit.transport!r}: use tcp or tls")
    if not 0 <= audit.syslog_port <= 65535:
        raise SettingsError(f"audit.syslog_port = {audit.syslog_port}: must be 0 (the transport's default) or 1-65535")
    if audit.batch_size < 1 or audit.retry_max_s <= 0 or audit.timeout_s <= 0:
        raise SettingsError(f"audit.batch_size = {audit.batch_size}, retry_max_s = {audit.retry_max_s}, "
                            f"timeout_s = {audit.timeout_s}: all must be > 0")  # fmt: skip
    if bool(audit.cert_file) != bool(audit.key_file):
        raise SettingsError("audit.cert_file and audit.key_file go together (a client certificate needs its key)")
    if not audit.app_name or len(audit.app_name) > 48 or not all(33 <= ord(c) <= 126 for c in audit.app_name):
        raise SettingsError(f"audit.app_name = {audit.app_name!r}: 1-48 printable ASCII characters, no spaces (RFC 5424 APP-NAME)")


def validate_limits(limits: LimitsSettings) -> None:
    if not 0.5 <= limits.establish_timeout_s <= 600:
        raise SettingsError(f"limits.establish_timeout_s = {limits.establish_timeout_s}: must be 0.5-600 seconds")
    if limits.max_connections < 1:
        raise SettingsError(f"limits.max_connections = {limits.max_connections}: must be >= 1")
    if not 0 <= limits.reserved_connections < limits.max_connections:
        raise SettingsError(f"limits.reserved_connections = {limits.reserved_connections}: must be >= 0 and below max_connections ({limits.max_connections})")
    if limits.max_connections_per_host < 1:
        raise SettingsError(f"limits.max_connections_per_host = {limits.max_connections_per_host}: must be >= 1")
    for entry in limits.trusted_hosts:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise SettingsError(f"limits.trusted_hosts contains {entry!r}: use an IP address or a network like 10.1.0.0/16") from None
    if limits.max_associate_rq_bytes < 1024:
        raise SettingsError(f"limits.max_associate_rq_bytes = {limits.max_associate_rq_bytes}: must be >= 1024")
    if limits.max_message_bytes < 65536:
        raise SettingsError(f"limits.max_message_bytes = {limits.max_message_bytes}: must be >= 65536")
    if limits.audit_window_s <= 0 or limits.audit_rejections_per_host < 0 or limits.audit_hosts_per_window < 1 or limits.audit_host_threshold <= 0:
        raise SettingsError(
            f"limits.audit_window_s = {limits.audit_window_s}, audit_rejections_per_host = {limits.audit_rejections_per_host}, "
            f"audit_hosts_per_window = {limits.audit_hosts_per_window}, audit_host_threshold = {limits.audit_host_threshold}: "
            "window > 0, rejections >= 0, hosts >= 1, threshold > 0"
        )
    if limits.audit_retention_days < 0:
        raise SettingsError(f"limits.audit_retention_days = {limits.audit_retention_days}: must be >= 0 (0 keeps everything)")
    if not 0.001 <= limits.idle_poll_s <= 1.0:
        raise SettingsError(f"limits.idle_poll_s = {limits.idle_poll_s}: must be 0.001-1.0 seconds")


def validate_tls(tls: TlsSettings, plain_port: int) -> None:
    """Settings only (the files are read when the node starts: ``dicom_node.net.tls.server_context``)."""
    if tls.min_version not in ("TLSv1.2", "TLSv1.3"):
        raise SettingsError(f"tls.min_version = {tls.min_version!r}: use TLSv1.2 or TLSv1.3 (BCP 195)")
    if tls.expiry_warning_days < 0:
        raise SettingsError(f"tls.expiry_warning_days = {tls.expiry_warning_days}: must be >= 0")
    if not tls.enabled:
        return
    if not 1 <= tls.port <= 65535:
        raise SettingsError(f"tls.port = {tls.port}: must be 1-65535")
    if tls.plain_port and tls.port == plain_port:
        raise SettingsError(f"tls.port = {tls.port}: the same as node.port; give TLS its own port, or set tls.plain_port = false")
    if tls.certificate is None or tls.private_key is None:
        raise SettingsError("tls.enabled = true needs tls.certificate and tls.private_key (PEM files)")
    if tls.require_client_certificate and tls.ca_certificates is None:
        raise SettingsError("tls.require_client_certificate = true needs tls.ca_certificates (the CAs of trusted clients)")


def settings_as_dict(settings: Settings) -> dict[str, Any]:
    """Plain dict view (for `anatomix-node config show` and logs)."""

    def convert(value: Any) -> Any:
        if is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in fields(value)}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, tuple):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(settings)
