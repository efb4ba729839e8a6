"""`gtvp-operator`: run the operator (kopf) against the cluster in the kubeconfig or in-cluster.

Runs standalone (one active replica). Serves Prometheus metrics and the /healthz and /readyz
probes on --metrics-port.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from gtvp import __version__


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gtvp-operator", description=__doc__)
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
        help="address /metrics listens on (0.0.0.0 in a pod)",
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
        help="address the webhooks listen on (0.0.0.0 in a pod)",
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
        "--no-create-members", action="store_true", help="do not create a Member for each Node"
    )
    p.add_argument(
        "--default-identity",
        type=int,
        default=1,
        help="identity (level ceiling) of Members created for new Nodes",
    )
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    if args.log_level.upper() == "INFO":
        # kopf logs a line per handled event ("Handler ... succeeded"): at thousands of
        # members that is most of the operator's output and a good share of its CPU;
        # gtvp logs what changed itself. --log-level debug brings them back.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    import kopf

    from gtvp import handlers, http_endpoints, kube
    from gtvp.handlers import members
    from gtvp.metrics import METRICS

    members.STATE.policy_name = args.policy
    members.STATE.create_members = not args.no_create_members
    members.STATE.default_identity = args.default_identity
    if args.webhook_port:
        if not (args.webhook_cert and args.webhook_key):
            print(
                "gtvp-operator: --webhook-cert and --webhook-key are required to serve the "
                "admission webhooks (or --webhook-port 0 to disable them)",
                file=sys.stderr,
            )
            return 2
        from gtvp.handlers import policy_admission, webhooks

        # imported for their @kopf.on.mutate / @kopf.on.validate handlers
        del policy_admission, webhooks
        members.STATE.webhook_server = kopf.WebhookServer(
            addr=args.webhook_address,
            port=args.webhook_port,
            certfile=args.webhook_cert,
            pkeyfile=args.webhook_key,
        )
    members.STATE.policy_error = f"SecurityPolicy {args.policy!r} not seen yet"
    try:
        members.STATE.clients = kube.make_clients(args.kubeconfig)
    except Exception as exc:  # noqa: BLE001 - one clear line for any configuration problem
        print(f"gtvp-operator: cannot configure the API client: {exc}", file=sys.stderr)
        return 2
    if args.metrics_port:

        def probe() -> http_endpoints.Probe:
            return http_endpoints.Probe(
                loaded=members.STATE.loaded,
                loop_started=members.STATE.heartbeat > 0,
                loop_idle_seconds=http_endpoints.idle_since(members.STATE.heartbeat),
            )

        try:
            http_endpoints.serve(args.metrics_port, args.metrics_address, METRICS.registry, probe)
        except OSError as exc:
            print(
                f"gtvp-operator: cannot serve /metrics, /healthz, /readyz on "
                f"{args.metrics_address}:{args.metrics_port}: {exc}",
                file=sys.stderr,
            )
            return 2
    logging.getLogger("gtvp").info(
        "gtvp-operator %s enforcing SecurityPolicy %r (handlers: %s)",
        __version__,
        args.policy,
        handlers.__name__,
    )

    async def run() -> None:
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=kube.API_THREADS, thread_name_prefix="gtvp-api")
        )
        await kopf.operator(clusterwide=True, standalone=True)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
