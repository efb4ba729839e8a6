"""Every alert the chart ships links to a runbook section that exists: an on-call engineer
who follows the link lands on what to do, not on the top of a page."""

from __future__ import annotations

import re

import yaml

from gtvp_local import layout


def _anchors() -> set[str]:
    """GitHub's anchors for the runbook's headings (lower case, spaces to dashes)."""
    text = (layout.repo_root() / "docs" / "runbooks.md").read_text()
    heads = (line[3:].strip().lower() for line in text.splitlines() if line.startswith("## "))
    return {re.sub(r"[^a-z0-9 -]", "", h).replace(" ", "-") for h in heads}


def test_every_alert_links_to_a_runbook_section_of_its_own_name() -> None:
    rules = yaml.safe_load(
        (layout.repo_root() / "charts" / "gtvp" / "files" / "alerts.yaml").read_text()
    )
    anchors = _anchors()
    alerts = [r for group in rules["groups"] for r in group["rules"] if "alert" in r]
    assert alerts
    for rule in alerts:
        url = rule["annotations"]["runbook_url"]
        assert url == f"RUNBOOK_BASE#{rule['alert'].lower()}", rule["alert"]
        assert rule["alert"].lower() in anchors, f"no runbook section for {rule['alert']}"
