"""`gtvp-operator`: run the operator (kopf) against the cluster in the kubeconfig or in-cluster.

Several replicas share the pool through Leases in --lease-namespace (see docs/architecture.md,
"High availability"): every replica answers admission, each member shard has one writer,
one replica leads the singleton loops. Serves Prometheus metrics and the /healthz and
/readyz probes on --metrics-port: plain HTTP on loopback by default; with --metrics-secure,
HTTPS with every /metrics request's bearer token reviewed by the API server (TokenReview,
then SubjectAccessReview for `get` on the non-resource URL /metrics).

Key release (docs/keyrelease.md): with --key-release-url, `POST /keyrelease/v1/release` and
the verdict tokens' public documents are served over HTTPS either on the secure metrics port
(--metrics-secure) or on their own port (--key-release-port), which answers nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gtvp import __version__
from gtvp.coordination import Coordination
from gtvp.core.shards import SHARDS, LeaseTiming
from gtvp.runtime import OperatorSettings, Runtime

if TYPE_CHECKING:
    from gtvp import http_endpoints
    from gtvp.core.keyrelease import Settings as KeyReleaseSettings


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gtvp-operator", description=__doc__)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument(
        "--kubeconfig",
        default=os.environ.get("KUBECONFIG"),
        help="kubeconfig (default: in-cluster service account)",
    )
    p.add_argument(
        "--policy",
        default=os.environ.get("GTVP_POLICY", "default"),
        help="the SecurityPolicy to enforce (default: default)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("GTVP_METRICS_PORT", "9090")),
        help="port of /metrics, /healthz and /readyz (0 disables)",
    )
    p.add_argument(
        "--metrics-address",
        default="127.0.0.1",
        help="address /metrics listens on (default 127.0.0.1; another one, * for every address "
        "with IPv6, needs --metrics-secure)",
    )
    p.add_argument(
        "--metrics-secure",
        action="store_true",
        help="serve /metrics over HTTPS to callers the API server authenticates and allows "
        "(get on the non-resource URL /metrics); the probes stay open",
    )
    p.add_argument(
        "--probe-port",
        type=int,
        default=int(os.environ.get("GTVP_PROBE_PORT", "0")),
        help="also answer /healthz and /readyz, nothing else, in plain HTTP on "
        "127.0.0.1:PORT, for probes run inside the pod (0, the default: only on --metrics-port)",
    )
    p.add_argument(
        "--metrics-cert",
        default=os.environ.get("GTVP_METRICS_CERT"),
        help="serving certificate for --metrics-secure (default: --webhook-cert)",
    )
    p.add_argument(
        "--metrics-key",
        default=os.environ.get("GTVP_METRICS_KEY"),
        help="its private key (default: --webhook-key)",
    )
    p.add_argument(
        "--webhook-port",
        type=int,
        default=int(os.environ.get("GTVP_WEBHOOK_PORT", "9443")),
        help="port of the admission webhooks (0 disables)",
    )
    p.add_argument(
        "--webhook-address",
        default="127.0.0.1",
        help="address the webhooks listen on: an IPv4 or IPv6 address, a name, or * for "
        "every address, IPv6 too (in a pod)",
    )
    p.add_argument(
        "--webhook-cert",
        default=os.environ.get("GTVP_WEBHOOK_CERT"),
        help="serving certificate (PEM) the API server trusts",
    )
    p.add_argument(
        "--webhook-key", default=os.environ.get("GTVP_WEBHOOK_KEY"), help="its private key (PEM)"
    )
    p.add_argument(
        "--webhook-client-ca",
        default=os.environ.get("GTVP_WEBHOOK_CLIENT_CA"),
        help="CA certificate(s) (PEM file) that sign the API server's webhook client "
        "certificate: callers without a certificate it signed are refused in the TLS "
        "handshake. A CA kept for this alone, never the cluster CA (docs/chart.md, "
        "'Only the API server calls the webhooks'); needs --webhook-client-name",
    )
    p.add_argument(
        "--webhook-client-name",
        action="append",
        default=[],
        metavar="NAME",
        help="common name of a client certificate that may call the webhooks (repeat for "
        "several API servers' names); others are refused with 403",
    )
    p.add_argument(
        "--no-create-members", action="store_true", help="do not create a Member for each Node"
    )
    p.add_argument(
        "--default-identity",
        type=int,
        default=1,
        help="identity (level ceiling) of Members created for new Nodes",
    )
    p.add_argument(
        "--token-audience",
        default=os.environ.get("GTVP_TOKEN_AUDIENCE", "gtvp"),
        help="the 'aud' of the signed verdict tokens (default: gtvp; docs/tokens.md)",
    )
    p.add_argument(
        "--token-issuer",
        default=os.environ.get("GTVP_TOKEN_ISSUER") or None,
        help="the 'iss' of the signed verdict tokens (default: gtvp.io/cluster/<uid of the "
        "kube-system namespace>; docs/tokens.md)",
    )
    p.add_argument(
        "--key-release-url",
        default=os.environ.get("GTVP_KEY_RELEASE_URL"),
        help="the HTTPS URL box VMs reach this operator's key-release port at (e.g. "
        "https://gtvp-operator.gtvp-system.svc:9090): serves POST /keyrelease/v1/release "
        "(needs --metrics-secure or --key-release-port; docs/keyrelease.md)",
    )
    p.add_argument(
        "--key-release-port",
        type=int,
        default=int(os.environ.get("GTVP_KEY_RELEASE_PORT", "0")),
        help="serve key release (and the tokens' public documents, nothing else) over HTTPS "
        "on this port instead of the secure metrics port (0, the default: on --metrics-port, "
        "which then needs --metrics-secure)",
    )
    p.add_argument(
        "--key-release-address",
        default=os.environ.get("GTVP_KEY_RELEASE_ADDRESS", "127.0.0.1"),
        help="address --key-release-port listens on (* in a pod: every address, IPv6 too)",
    )
    p.add_argument(
        "--key-release-cert",
        default=os.environ.get("GTVP_KEY_RELEASE_CERT"),
        help="serving certificate of --key-release-port (default: --webhook-cert)",
    )
    p.add_argument(
        "--key-release-key",
        default=os.environ.get("GTVP_KEY_RELEASE_KEY"),
        help="its private key (default: --webhook-key)",
    )
    p.add_argument(
        "--key-release-ca",
        default=os.environ.get("GTVP_KEY_RELEASE_CA"),
        help="CA certificate (PEM file) box VMs check that URL's certificate with "
        "(put in their cloud-init; default: the guest's own trust store)",
    )
    p.add_argument("--log-level", default="INFO")
    _lease_arguments(p)
    return p


def _lease_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("high availability (Leases)")
    g.add_argument(
        "--identity",
        default=os.environ.get("GTVP_IDENTITY") or f"{socket.gethostname()}-{os.getpid()}",
        help="this replica's name in the Leases (default: hostname-pid; the pod name in a pod)",
    )
    g.add_argument(
        "--lease-namespace",
        default=os.environ.get("GTVP_LEASE_NAMESPACE", "gtvp-system"),
        help="namespace of the replicas' Leases (default: gtvp-system)",
    )
    g.add_argument("--shards", type=int, default=SHARDS, help=f"member shards (default {SHARDS})")
    g.add_argument("--lease-duration", type=float, default=15.0, help="seconds (default 15)")
    g.add_argument("--renew-deadline", type=float, default=10.0, help="seconds (default 10)")
    g.add_argument("--retry-period", type=float, default=2.0, help="seconds (default 2)")
    g.add_argument(
        "--shutdown-grace",
        type=float,
        default=5.0,
        help="after SIGTERM: seconds of answering admission while unready (default 5)",
    )
    g.add_argument(
        "--no-leases",
        action="store_true",
        help="run as the only replica: no Leases (never with more than one replica)",
    )


def settings_from(args: argparse.Namespace) -> OperatorSettings:
    return OperatorSettings(
        policy_name=args.policy,
        create_members=not args.no_create_members,
        default_identity=args.default_identity,
        kubeconfig=args.kubeconfig,
        metrics_port=args.metrics_port,
        metrics_address=args.metrics_address,
        webhook_port=args.webhook_port,
        webhook_address=args.webhook_address,
        webhook_cert=args.webhook_cert,
        webhook_key=args.webhook_key,
        webhook_client_ca=args.webhook_client_ca,
        webhook_client_names=tuple(args.webhook_client_name),
        log_level=args.log_level.upper(),
        identity=args.identity,
        lease_namespace=args.lease_namespace,
        shards=args.shards,
        lease_timing=LeaseTiming(args.lease_duration, args.renew_deadline, args.retry_period),
        shutdown_grace=args.shutdown_grace,
        coordinate=not args.no_leases,
    )


def check_webhook_clients(args: argparse.Namespace) -> None:
    """ValueError unless --webhook-client-ca and --webhook-client-name come together and the
    CA file holds CA certificates (read now: a bad file is a clear error at start, not a
    listener that kopf retries for ever)."""
    if not args.webhook_client_ca and not args.webhook_client_name:
        return
    if not args.webhook_client_ca:
        raise ValueError(
            "--webhook-client-name needs --webhook-client-ca: names are only checked on "
            "certificates that CA signed"
        )
    if not args.webhook_client_name:
        raise ValueError(
            "--webhook-client-ca needs --webhook-client-name: the common name of the API "
            "server's webhook client certificate (any certificate of the CA would pass)"
        )
    if not args.webhook_port:
        raise ValueError(
            "--webhook-client-ca is for the webhooks, which --webhook-port 0 turns off"
        )
    for name in args.webhook_client_name:
        if not name.strip() or name != name.strip():
            raise ValueError(f"--webhook-client-name {name!r}: a certificate common name is needed")
    import re

    from cryptography import x509

    try:
        with open(args.webhook_client_ca, "rb") as f:
            pem = f.read()
    except OSError as exc:
        raise ValueError(
            f"cannot read --webhook-client-ca {args.webhook_client_ca}: {exc}"
        ) from exc
    others = sorted(
        {
            label.decode("ascii", "replace")
            for label in re.findall(rb"-----BEGIN ([A-Z0-9 ]+)-----", pem)
            if label != b"CERTIFICATE"
        }
    )
    if others:
        raise ValueError(
            f"--webhook-client-ca {args.webhook_client_ca} holds {', '.join(others)} besides "
            "certificates: give the CA's certificates only (whoever reads a key there can sign "
            "a certificate the webhooks accept)"
        )
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise ValueError(
            f"--webhook-client-ca {args.webhook_client_ca} holds no PEM certificate: {exc}"
        ) from exc
    for cert in certs:
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise ValueError(
                f"--webhook-client-ca {args.webhook_client_ca}: {cert.subject.rfc4514_string()} "
                "is not a CA certificate (give the CA that signs the client certificate)"
            )


@dataclass(frozen=True)
class MetricsServing:
    """How /metrics is served: plain HTTP (loopback only) or HTTPS with reviewed tokens."""

    secure: bool = False
    cert: str | None = None
    key: str | None = None


def metrics_serving_from(args: argparse.Namespace) -> MetricsServing:
    """ValueError when the flags would serve unauthenticated metrics beyond loopback, or
    secure metrics without a certificate."""
    from gtvp.metrics_auth import plain_http_allowed

    if not args.metrics_secure:
        if args.metrics_port and not plain_http_allowed(args.metrics_address):
            raise ValueError(
                f"--metrics-address {args.metrics_address} without --metrics-secure would serve "
                "/metrics in plain HTTP to anyone who can reach it: use --metrics-secure, or "
                "127.0.0.1 behind a proxy"
            )
        return MetricsServing()
    cert = args.metrics_cert or args.webhook_cert
    key = args.metrics_key or args.webhook_key
    if not (cert and key):
        raise ValueError(
            "--metrics-secure needs a serving certificate: --metrics-cert and --metrics-key "
            "(or --webhook-cert and --webhook-key)"
        )
    return MetricsServing(secure=True, cert=cert, key=key)


def _configure_logging(settings: OperatorSettings) -> None:
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.log_level == "INFO":
        # kopf logs a line per handled event ("Handler ... succeeded"): at thousands of
        # members that is most of the operator's output and a good share of its CPU;
        # gtvp logs what changed itself. --log-level debug brings them back.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)


def _fail(message: str) -> int:
    print(f"gtvp-operator: {message}", file=sys.stderr)
    return 2


def _public_documents(rt: Runtime) -> http_endpoints.Public | None:
    """The verdict tokens' JWKS and each member's current token (gtvp.verdict_keys)."""
    from gtvp import verdict_keys

    issuer = rt.verdict_issuer

    def token_of(name: str) -> str | None:
        body = rt.view.member_body(name) or {}  # a verdict held, not the one stored
        token = ((body.get("status") or {}).get("trust") or {}).get("token")
        return str(token) if token else None

    return verdict_keys.documents(issuer, token_of) if issuer is not None else None


def _probe_reader(rt: Runtime) -> Callable[[], http_endpoints.Probe]:
    """What the probes read, from the runtime, at each probe."""
    from gtvp import http_endpoints

    def probe() -> http_endpoints.Probe:
        co = rt.coordination
        return http_endpoints.Probe(
            loaded=rt.view.loaded,
            loop_started=rt.schedule.heartbeat > 0,
            loop_idle_seconds=http_endpoints.idle_since(rt.schedule.heartbeat),
            unready_because=(
                None
                if co.ready()
                else "shutting down"
                if co.stopping
                else co.refused or "its presence Lease is not renewed yet"
            ),
            broken=None if rt.webhook_server is None else rt.webhook_server.failed,
        )

    return probe


def probe_port_from(args: argparse.Namespace) -> int:
    """The loopback probe port the flags ask for (0: none); ValueError when it is not a
    port or is taken by another of the operator's ports."""
    port = int(args.probe_port or 0)
    if not port:
        return 0
    if not 0 < port < 65536:
        raise ValueError(f"--probe-port {port}: a TCP port (1-65535) is needed")
    for flag, taken in (
        ("--metrics-port", args.metrics_port),
        ("--webhook-port", args.webhook_port),
        ("--key-release-port", args.key_release_port),
    ):
        if port == taken:
            raise ValueError(f"--probe-port {port} is also the {flag}: give it a port of its own")
    return port


def _serve_probes(rt: Runtime, serving: MetricsServing, *, release_here: bool = True) -> None:
    """/metrics, /healthz and /readyz on a thread (OSError when the port is taken or the
    certificate cannot be read), with the verdict tokens' public documents, and key release
    when it is on and `release_here` (not on its own port)."""
    import time

    from gtvp import http_endpoints, metrics_auth
    from gtvp.metrics import METRICS

    public = _public_documents(rt)
    probe = _probe_reader(rt)
    settings = rt.settings
    if not serving.secure or serving.cert is None or serving.key is None:
        http_endpoints.serve(
            settings.metrics_port,
            settings.metrics_address,
            METRICS.registry,
            probe,
            public=public,
        )
        return
    release = None
    box_attest = None
    if rt.key_release is not None and release_here:
        from gtvp import box_attestation, key_release

        release = key_release.Endpoint(rt)
        box_attest = box_attestation.Endpoint(rt)
    review_token, review_access = metrics_auth.api_reviewer(rt.clients.api)
    guard = metrics_auth.Guard(review_token, review_access, clock=time.monotonic)
    http_endpoints.serve(
        settings.metrics_port,
        settings.metrics_address,
        METRICS.registry,
        probe,
        tls=metrics_auth.TlsFiles(serving.cert, serving.key).context,
        guard=guard.check,
        public=public,
        release=release,
        box_attest=box_attest,
    )


def _serve_key_release(rt: Runtime, own: KeyReleaseServing) -> None:
    """Key release and the public documents, and nothing else, over HTTPS on their own port
    (OSError when the port is taken or the certificate cannot be read)."""
    from gtvp import box_attestation, http_endpoints, key_release, metrics_auth
    from gtvp.metrics import METRICS

    http_endpoints.serve(
        own.port,
        own.address,
        METRICS.registry,
        lambda: http_endpoints.Probe(loaded=False, loop_started=False, loop_idle_seconds=0),
        tls=metrics_auth.TlsFiles(own.cert, own.key).context,
        public=_public_documents(rt),
        release=key_release.Endpoint(rt),
        box_attest=box_attestation.Endpoint(rt),
        only_public=True,
    )


@dataclass(frozen=True)
class KeyReleaseServing:
    """Key release on its own HTTPS port (--key-release-port), apart from the metrics."""

    port: int
    address: str
    cert: str
    key: str


def key_release_serving_from(args: argparse.Namespace) -> KeyReleaseServing | None:
    """Key release's own port as the flags ask (None: none, key release if any is on the
    secure metrics port); ValueError on flags that do not fit together."""
    port = int(args.key_release_port or 0)
    own_cert = bool(args.key_release_cert or args.key_release_key)
    if not port:
        if own_cert:
            raise ValueError(
                "--key-release-cert and --key-release-key are for --key-release-port: "
                "give the port too (or leave them out: the metrics port uses --metrics-cert)"
            )
        return None
    if not 0 < port < 65536:
        raise ValueError(f"--key-release-port {port}: a TCP port (1-65535) is needed")
    if not args.key_release_url:
        raise ValueError(
            "--key-release-port needs --key-release-url: the https:// URL box VMs reach "
            "that port at (it goes into their cloud-init)"
        )
    for flag, taken in (
        ("--metrics-port", args.metrics_port),
        ("--webhook-port", args.webhook_port),
    ):
        if port == taken:
            raise ValueError(
                f"--key-release-port {port} is also the {flag}: key release needs a port "
                "of its own (or no --key-release-port: served on the secure metrics port)"
            )
    if own_cert and not (args.key_release_cert and args.key_release_key):
        raise ValueError("--key-release-cert and --key-release-key go together: give both")
    cert = args.key_release_cert or args.webhook_cert
    key = args.key_release_key or args.webhook_key
    if not (cert and key):
        raise ValueError(
            "--key-release-port needs a serving certificate: --key-release-cert and "
            "--key-release-key (or --webhook-cert and --webhook-key)"
        )
    return KeyReleaseServing(port=port, address=args.key_release_address, cert=cert, key=key)


def key_release_from(
    args: argparse.Namespace, serving: MetricsServing
) -> KeyReleaseSettings | None:
    """Key release as the flags ask (None: not served); ValueError when it could not be
    served over TLS or its CA file cannot be read."""
    from gtvp.core.keyrelease import Settings

    if not args.key_release_url:
        return None
    if not args.key_release_port and not (serving.secure and args.metrics_port):
        raise ValueError(
            "--key-release-url needs --metrics-secure (served on the metrics port) or "
            "--key-release-port (its own port): the key-release endpoint is TLS only"
        )
    if not str(args.key_release_url).startswith("https://"):
        raise ValueError(f"--key-release-url {args.key_release_url}: an https:// URL is needed")
    ca_pem = None
    if args.key_release_ca:
        try:
            with open(args.key_release_ca, encoding="ascii") as f:
                ca_pem = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read --key-release-ca {args.key_release_ca}: {exc}") from exc
        if "-----BEGIN CERTIFICATE-----" not in ca_pem:
            # an empty file would leave every guest trusting its own store, or nothing
            raise ValueError(
                f"--key-release-ca {args.key_release_ca} holds no PEM certificate: give the "
                "CA that signs the key-release port's certificate"
            )
    return Settings(url=args.key_release_url, ca_pem=ca_pem)


def _runtime(settings: OperatorSettings) -> Runtime:
    """The runtime every handler is handed (ValueError, OSError... on a bad configuration)."""
    from gtvp import kube

    clients = kube.make_clients(
        settings.kubeconfig, field_manager=f"gtvp-operator/{settings.identity}"[:128]
    )
    coordination = (
        Coordination(
            identity=settings.identity,
            namespace=settings.lease_namespace,
            shards=settings.shards,
            timing=settings.lease_timing,
        )
        if settings.coordinate
        else Coordination.sole()
    )
    rt = Runtime(settings=settings, clients=clients, coordination=coordination)
    if settings.webhook_port:
        from gtvp.metrics import METRICS
        from gtvp.webhook_config import WEBHOOK_IDS
        from gtvp.webhook_server import DrainingWebhookServer

        rt.webhook_server = DrainingWebhookServer(
            addr=settings.webhook_address,
            port=settings.webhook_port,
            certfile=settings.webhook_cert,
            pkeyfile=settings.webhook_key,
            closing=lambda: rt.coordination.stopping,
            webhook_ids=WEBHOOK_IDS,
            client_ca=settings.webhook_client_ca,
            client_names=settings.webhook_client_names,
            refused=METRICS.webhook_refused,
        )
    return rt


def _serve_http(
    rt: Runtime, serving: MetricsServing, own_port: KeyReleaseServing | None, probe_port: int
) -> str | None:
    """Start the metrics, key-release and probe servers the flags ask for; why one could
    not start (None: all started)."""
    from gtvp import http_endpoints

    settings = rt.settings
    if settings.metrics_port:
        try:
            _serve_probes(rt, serving, release_here=own_port is None)
        except OSError as exc:
            return (
                f"cannot serve /metrics, /healthz, /readyz on "
                f"{settings.metrics_address}:{settings.metrics_port}: {exc}"
            )
    if probe_port:
        try:
            http_endpoints.serve_probes(probe_port, _probe_reader(rt))
        except OSError as exc:
            return (
                f"cannot serve /healthz, /readyz on "
                f"{http_endpoints.PROBES_ADDRESS}:{probe_port}: {exc}"
            )
    if own_port is not None and rt.key_release is not None:
        try:
            _serve_key_release(rt, own_port)
        except OSError as exc:
            return f"cannot serve key release on {own_port.address}:{own_port.port}: {exc}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = settings_from(args)
        check_webhook_clients(args)
        serving = metrics_serving_from(args)
        key_release = key_release_from(args, serving)
        own_port = key_release_serving_from(args)
        probe_port = probe_port_from(args)
    except ValueError as exc:  # inconsistent flags (lease timing, metrics off loopback...)
        return _fail(str(exc))
    _configure_logging(settings)
    if settings.kubeconfig:
        # before the kubernetes client is imported: it reads its default path at import,
        # and kopf's login (`kopf.login_via_client`) uses that default
        os.environ["KUBECONFIG"] = settings.kubeconfig
    if settings.webhook_port and not (settings.webhook_cert and settings.webhook_key):
        return _fail(
            "--webhook-cert and --webhook-key are required to serve the "
            "admission webhooks (or --webhook-port 0 to disable them)"
        )
    try:
        rt = _runtime(settings)
    except Exception as exc:  # noqa: BLE001 - one clear line for any configuration problem
        return _fail(f"cannot configure the API client: {exc}")
    from gtvp import verdict_keys

    rt.verdict_issuer = verdict_keys.Issuer(
        namespace=settings.lease_namespace,
        audience=args.token_audience,
        name=args.token_issuer,
    )
    rt.key_release = key_release
    failed = _serve_http(rt, serving, own_port, probe_port)
    if failed is not None:
        return _fail(failed)
    logging.getLogger("gtvp").info(
        "gtvp-operator %s enforcing SecurityPolicy %r as replica %r%s",
        __version__,
        settings.policy_name,
        settings.identity,
        f" (Leases in namespace {settings.lease_namespace})" if settings.coordinate else "",
    )
    if settings.webhook_port:
        _say_who_may_call(settings)
    asyncio.run(_run(rt))
    return 0


def _say_who_may_call(settings: OperatorSettings) -> None:
    log = logging.getLogger("gtvp")
    if settings.webhook_client_ca:
        log.info(
            "webhooks on port %d answer only client certificates of %s named %s",
            settings.webhook_port,
            settings.webhook_client_ca,
            ", ".join(settings.webhook_client_names),
        )
    else:
        log.warning(
            "webhooks on port %d answer any caller (no --webhook-client-ca): whoever reaches "
            "the port can ask about any VMI (docs/chart.md, 'Only the API server calls the "
            "webhooks')",
            settings.webhook_port,
        )


async def _run(rt: Runtime) -> None:
    import kopf

    from gtvp import handlers, kube

    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=kube.API_THREADS, thread_name_prefix="gtvp-api")
    )
    registry = kopf.OperatorRegistry()
    handlers.register(registry, admission_webhooks=rt.webhook_server is not None)
    rt.stop_flag = asyncio.Event()
    await _keep_verdict_keys(rt)
    # standalone: kopf's own peering would pause every replica but one; gtvp's replicas
    # divide the work through their Leases instead (gtvp.handlers.leases)
    from gtvp.webhook_server import AdmissionMemories

    await kopf.operator(
        registry=registry,
        memo=kopf.Memo(runtime=rt),
        memories=AdmissionMemories(),
        clusterwide=True,
        standalone=True,
        stop_flag=rt.stop_flag,
    )


async def _keep_verdict_keys(rt: Runtime) -> None:
    """Load (or create) the verdict signing keys before the first verdict, then keep them
    current (gtvp.verdict_keys); a failure is logged and retried by the loop."""
    from gtvp import verdict_keys

    issuer = rt.verdict_issuer
    if issuer is None:
        return
    await verdict_keys.load_once(rt.clients, issuer)
    task = asyncio.get_running_loop().create_task(
        verdict_keys.keep(
            rt.clients,
            issuer,
            leader=rt.coordination.leads,
            retention=lambda: verdict_keys.longest_validity(rt.view.policy),
            stop=rt.stop,
        ),
        name="gtvp-verdict-keys",
    )
    rt.tasks.append(task)


if __name__ == "__main__":
    sys.exit(main())
