"""`gtvp policy learn`: propose a measured-boot reference set from a member's event log
(and `gtvp policy check`, in `gtvp.policy_check_cli`).

- `gtvp policy learn --member NAME [--kubeconfig FILE]`: reads the Member; it must be
  Trusted (a boot gtvp has not verified is never proposed), and its latest evidence's event
  log (status.agent.evidence.eventLog) must replay to the PCR values it reported. Proposes
  a reference set for the member's class under the SecurityPolicy it was judged by.
- `gtvp policy learn --event-log FILE`: the same from a log file, offline.

It prints a JSON patch (as YAML) that adds the set to the class's `referenceSets`, with
comments saying what it accepts. It never applies anything: a person reviews it (it
accepts exactly the boot the log shows, good or bad) and applies it with
`kubectl patch securitypolicy NAME --type json --patch-file FILE`. Exit 0 with a proposal,
1 when there is nothing to learn from (member not Trusted, no event log, malformed log), 2
on unusable options or an unreadable cluster. `--event-log` imports no Kubernetes client.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime as dt
import hashlib
import hmac
import os
import re
import sys
from pathlib import Path
from typing import Any

from gtvp import local_state, policy_check_cli
from gtvp.core.api_resources import MEMBERS, SECURITY_POLICIES
from gtvp.core.errors import MalformedEvidence, VerificationError
from gtvp.core.eventlog import EventLog, parse_event_log
from gtvp.core.policy import firmware_measures, resettable_pcrs_message
from gtvp.core.refvalues import check_replay, learn

DEFAULT_PCRS = tuple(range(8))


class Refused(Exception):
    """Nothing can be learned; the message says why (exit 1)."""


class BadInput(Exception):
    """Unusable options or an unreadable cluster (exit 2)."""


def register(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="policy_cmd", metavar="{learn,check}")
    r = sub.add_parser(
        "learn",
        help="propose a reference set from a Trusted member's event log (never applied)",
        description=(
            "Print a SecurityPolicy JSON patch (YAML) adding a measured-boot reference set "
            "that accepts the boot in a Trusted member's latest event log, or in a log file. "
            "Nothing is applied: review it, then kubectl patch securitypolicy NAME --type "
            "json --patch-file FILE."
        ),
    )
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--member", help="learn from this Trusted member's latest event log")
    src.add_argument("--event-log", help="learn from this binary event log file (offline)")
    r.add_argument("--kubeconfig", help="with --member: the cluster (default $KUBECONFIG)")
    r.add_argument("--name", help="the reference set's name (default learned-SOURCE-DATE)")
    r.add_argument(
        "--pcrs",
        help="PCRs the set governs, e.g. 0-7 or 0,2,4,7 (default: the policy's selection with "
        "--member, 0-7 with --event-log); a PCR with no events gets a rule allowing none",
    )
    r.add_argument("--bank", help="digest bank (default: the policy's; sha256 offline)")
    r.add_argument(
        "--class-index",
        type=int,
        default=0,
        help="with --event-log: index of the member class in spec.memberClasses (default 0)",
    )
    r.add_argument(
        "--not-after", help="end of the set's validity window (RFC 3339), e.g. for a canary"
    )
    r.set_defaults(func=run_learn)
    policy_check_cli.register(sub)


def _pcr_list(text: str) -> tuple[int, ...]:
    pcrs: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError as exc:
            raise BadInput(f"--pcrs {text!r}: not PCR indices such as 0-7 or 0,2,4,7") from exc
        if not 0 <= first <= last <= 23:
            raise BadInput(f"--pcrs {text!r}: PCR indices are 0 to 23")
        pcrs.update(range(first, last + 1))
    resettable = resettable_pcrs_message(tuple(pcrs))
    if resettable:
        raise BadInput(f"--pcrs {text!r}: {resettable}")
    return tuple(sorted(pcrs))


def _set_name(source: str, now: dt.datetime) -> str:
    stem = re.sub(r"[^a-z0-9-]+", "-", source.lower()).strip("-")[:36] or "log"
    return f"learned-{stem}-{now:%Y%m%d-%H%M}"


def _parse(data: bytes, where: str) -> EventLog:
    try:
        return parse_event_log(data)
    except MalformedEvidence as exc:
        raise Refused(f"{where} is not a usable TCG event log: {exc.message}") from exc


def render(
    ref_set: dict[str, Any],
    *,
    path_prefix: str,
    has_sets: bool | None,
    comments: list[str],
) -> str:
    """The proposal as a commented JSON patch in YAML."""
    import yaml

    ops: list[dict[str, Any]]
    if has_sets is False:
        ops = [{"op": "add", "path": f"{path_prefix}/referenceSets", "value": [ref_set]}]
    else:
        ops = [{"op": "add", "path": f"{path_prefix}/referenceSets/-", "value": ref_set}]
    head = "".join(f"# {c}\n" for c in comments)
    return head + yaml.safe_dump(ops, sort_keys=False, width=200)


def _proposal(
    ref_set: dict[str, Any], *, path_prefix: str, has_sets: bool | None, comments: list[str]
) -> tuple[str, str | None]:
    """The rendered proposal, with `unmeasured`'s warning among its comments, and that
    warning (for stderr; None: nothing to warn of)."""
    warning = unmeasured(ref_set)
    comments = [*comments, *([warning] if warning else [])]
    return render(ref_set, path_prefix=path_prefix, has_sets=has_sets, comments=comments), warning


def unmeasured(ref_set: dict[str, Any]) -> str | None:
    """A warning when the set allows no event on a boot-chain PCR (0-7): the log came from
    a boot no firmware measured (a TPM emulator's, or a host whose firmware logged
    nothing), and applied, the policy accepts such a boot there (it is marked Weak)."""
    empty = sorted(
        int(p["pcr"]) for p in ref_set.get("pcrs") or () if firmware_measures(int(p["pcr"]))
        and not p["events"]
    )  # fmt: skip
    if not empty:
        return None
    return (
        f"WARNING: the log shows no event on PCR(s) {', '.join(map(str, empty))}: firmware "
        "logs at least a separator there, so this boot was not measured by one; the set "
        "accepts any host whose firmware measured nothing there (the policy is marked Weak)"
    )


def _counts(ref_set: dict[str, Any]) -> str:
    pcrs = ref_set.get("pcrs") or []
    n = sum(len(ev["digests"]) for p in pcrs for ev in p["events"])
    return f"{n} event digests on PCRs {[p['pcr'] for p in pcrs]}"


def _from_file(args: argparse.Namespace, now: dt.datetime) -> tuple[str, str | None]:
    try:
        data = Path(args.event_log).read_bytes()
    except OSError as exc:
        raise BadInput(f"cannot read --event-log {args.event_log}: {exc.strerror}") from exc
    log = _parse(data, args.event_log)
    bank = args.bank or "sha256"
    if bank not in log.pcrs:
        raise Refused(f"{args.event_log} has no {bank} digests (its banks: {sorted(log.pcrs)})")
    pcrs = _pcr_list(args.pcrs) if args.pcrs else DEFAULT_PCRS
    ref_set = learn(log, bank, pcrs, name=args.name or _set_name(Path(args.event_log).name, now))
    _window(ref_set, args)
    return _proposal(
        ref_set,
        path_prefix=f"/spec/memberClasses/{args.class_index}",
        has_sets=None,
        comments=[
            f"gtvp policy learn: reference set proposed from {args.event_log} "
            f"({_counts(ref_set)}, {bank}).",
            "NOT APPLIED. It accepts exactly the boot this log shows, good or bad: review it.",
            f"It adds to spec.memberClasses[{args.class_index}].referenceSets; if that class has "
            "none yet, use the path without /- and put the value in a list.",
            "Apply: kubectl patch securitypolicy POLICY --type json --patch-file THIS_FILE",
        ],
    )


def _window(ref_set: dict[str, Any], args: argparse.Namespace) -> None:
    if args.not_after:
        try:
            t = dt.datetime.fromisoformat(str(args.not_after).replace("Z", "+00:00"))
        except ValueError as exc:
            raise BadInput(f"--not-after {args.not_after!r} is not an RFC 3339 time") from exc
        if t.tzinfo is None:
            raise BadInput(f"--not-after {args.not_after!r} needs a time zone (e.g. Z)")
        ref_set["notAfter"] = t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _kubeconfig(args: argparse.Namespace) -> str:
    path = args.kubeconfig or os.environ.get("KUBECONFIG")
    if not path:
        local = local_state.admin_kubeconfig()
        path = str(local) if local.exists() else None
    if not path:
        raise BadInput("no cluster: give --kubeconfig or set KUBECONFIG")
    if not Path(path).is_file():
        raise BadInput(f"kubeconfig {path} does not exist")
    return path


def _trusted_log(member: str, status: dict[str, Any], evidence: dict[str, Any]) -> EventLog:
    """The member's latest event log, once the member is Trusted."""
    trust = status.get("trust") or {}
    if status.get("phase") != "Trusted" or trust.get("verdict") != "Trusted":
        raise Refused(
            f"member {member} is {status.get('phase') or 'without a phase'} "
            f"({trust.get('reason', 'no verdict')}): only a Trusted member's boot is proposed "
            "(learning from a boot gtvp did not verify could allow a tampered one)"
        )
    raw = evidence.get("eventLog")
    if not raw:
        raise Refused(
            f"member {member}'s latest evidence has no event log (status.agent.evidence."
            "eventLog): its agent sends none"
        )
    try:
        data = base64.b64decode(str(raw), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Refused(f"member {member}'s event log is not base64") from exc
    # the agent may rewrite its evidence at any time: only the log the verdict replayed
    # against the signed PCRs is the boot gtvp verified
    verified = trust.get("eventLogSHA256")
    if not verified:
        raise Refused(
            f"member {member}'s verdict names no event log it verified (status.trust."
            "eventLogSHA256: its last verified quote came without a log that reproduces the "
            "quoted PCRs): run this again after its next quote"
        )
    if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), str(verified)):
        raise Refused(
            f"member {member}'s event log (status.agent.evidence.eventLog) is not the one its "
            "Trusted verdict verified: its agent wrote new evidence since (an answer the "
            "operator has not judged yet, or a log rewritten after the verdict); run this "
            "again after its next verified quote"
        )
    return _parse(data, f"member {member}'s event log")


def _from_member(args: argparse.Namespace, now: dt.datetime) -> tuple[str, str | None]:
    from kubernetes import client, config

    kubeconfig = _kubeconfig(args)
    try:
        custom = client.CustomObjectsApi(config.new_client_from_config(config_file=kubeconfig))
        member: dict[str, Any] = custom.get_cluster_custom_object(*MEMBERS.coordinates, args.member)
    except client.exceptions.ApiException as exc:
        if exc.status == 404:
            raise Refused(f"there is no Member {args.member}") from exc
        raise BadInput(f"cannot read Member {args.member}: {exc.status} {exc.reason}") from exc
    except Exception as exc:  # an unreachable server or an unusable kubeconfig
        raise BadInput(f"cannot read the cluster ({kubeconfig}): {exc}") from exc
    status = member.get("status") or {}
    trust = status.get("trust") or {}
    evidence = (status.get("agent") or {}).get("evidence") or {}
    log = _trusted_log(args.member, status, evidence)
    effective = status.get("effectivePolicy") or {}
    policy_name = str(effective.get("policy") or "")
    class_name = str(trust.get("memberClass") or effective.get("memberClass") or "")
    policy_spec: dict[str, Any] = {}
    if policy_name:
        try:
            policy_spec = custom.get_cluster_custom_object(
                *SECURITY_POLICIES.coordinates, policy_name
            ).get("spec", {})
        except client.exceptions.ApiException as exc:
            raise BadInput(f"cannot read SecurityPolicy {policy_name}: {exc.reason}") from exc
    selection = policy_spec.get("pcrSelection") or {}
    bank = args.bank or str(selection.get("hashAlgorithm") or "sha256")
    verified_bank = str(trust.get("eventLogBank") or "")
    if bank != verified_bank:
        raise Refused(
            f"member {args.member}'s log was verified in the {verified_bank or '(unknown)'} "
            f"bank, not {bank}: only digests of the bank its quote signed were checked"
        )
    if bank not in log.pcrs:
        raise Refused(f"member {args.member}'s event log has no {bank} digests")
    pcrs = _pcr_list(args.pcrs) if args.pcrs else tuple(selection.get("pcrs") or DEFAULT_PCRS)
    checked = {int(p) for p in trust.get("eventLogPCRs") or ()}
    unchecked = sorted(set(pcrs) - checked)
    if unchecked:
        raise Refused(
            f"member {args.member}'s verified quote did not cover PCR(s) "
            f"{', '.join(map(str, unchecked))} (its log was checked on "
            f"{', '.join(map(str, sorted(checked))) or 'none'}): nothing it logged there was "
            "verified; run this again after its next quote under the current pcrSelection, "
            "or narrow --pcrs"
        )
    reported = {int(p): bytes.fromhex(str(v)) for p, v in (evidence.get("pcrValues") or {}).items()}
    if str(evidence.get("pcrBank") or bank) == bank:
        try:
            check_replay(log, reported, bank, [p for p in pcrs if p in reported])
        except VerificationError as exc:
            raise Refused(
                f"member {args.member}'s event log does not reproduce the PCR values it "
                f"reported: {exc.message}"
            ) from exc
    ref_set = learn(log, bank, pcrs, name=args.name or _set_name(args.member, now))
    _window(ref_set, args)
    classes = policy_spec.get("memberClasses") or []
    index = next((i for i, c in enumerate(classes) if c.get("name") == class_name), None)
    if index is None:
        raise Refused(
            f"member {args.member}'s class {class_name or '(none)'} is not in SecurityPolicy "
            f"{policy_name or '(unknown)'}: nothing to add the set to"
        )
    return _proposal(
        ref_set,
        path_prefix=f"/spec/memberClasses/{index}",
        has_sets=bool(classes[index].get("referenceSets")),
        comments=[
            f"gtvp policy learn: reference set proposed from member {args.member}'s latest "
            f"event log ({_counts(ref_set)}, {bank}),",
            f"for member class {class_name} (spec.memberClasses[{index}]) of SecurityPolicy "
            f"{policy_name}.",
            "NOT APPLIED. It accepts exactly the boot this member ran, good or bad: review it.",
            f"Apply: kubectl patch securitypolicy {policy_name} --type json --patch-file THIS_FILE",
        ],
    )


def run_learn(args: argparse.Namespace) -> int:
    now = dt.datetime.now(dt.UTC)
    try:
        out, warning = (
            _from_file(args, now) if args.event_log is not None else _from_member(args, now)
        )
    except Refused as exc:
        print(f"gtvp policy learn: {exc}", file=sys.stderr)
        return 1
    except BadInput as exc:
        print(f"gtvp policy learn: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(out)
    if warning is not None:
        print(f"gtvp policy learn: {warning}", file=sys.stderr)
    return 0
