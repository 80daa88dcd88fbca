"""The documentation's links: every relative link in README.md and docs/*.md names a file that exists
and, with a ``#fragment``, a heading of that file (GitHub's anchor rules). The command tables are
compared with ``--help`` in tests/dicom_node/test_cli_day_one.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
#: [text](target) outside code spans; images too.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _without_code(text: str) -> str:
    """The text with fenced code blocks and inline code spans blanked (links there are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to hyphens."""
    text = re.sub(r"`", "", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    counts: dict[str, int] = {}
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        base = anchor(heading)
        n = counts.get(base, 0)
        found.add(base if n == 0 else f"{base}-{n}")
        counts[base] = n + 1
    return found


def links(path: Path) -> list[str]:
    return [target for target in LINK.findall(_without_code(path.read_text())) if not re.match(r"[a-z]+:", target)]


def test_the_docs_exist_and_the_readme_is_a_front_door() -> None:
    names = {path.name for path in DOCS}
    for name in ("admin-guide.md", "configuration.md", "api.md", "architecture.md", "measured-figures.md", "results.md",
                 "security.md", "conformance-statement.md"):  # fmt: skip
        assert name in names, name
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert "make demo" in readme and "make test" in readme
    linked = {Path(target.split("#")[0]).name for target in links(REPO / "README.md")}
    assert names - {"README.md"} <= linked, "README.md links every file in docs/"


@pytest.mark.parametrize("path", DOCS, ids=lambda path: path.name)
def test_relative_links_resolve(path: Path) -> None:
    broken = []
    for target in links(path):
        file_part, _, fragment = target.partition("#")
        target_path = (path.parent / file_part).resolve() if file_part else path
        if not target_path.exists():
            broken.append(f"{target}: no file {target_path.relative_to(REPO) if target_path.is_relative_to(REPO) else target_path}")
        elif fragment and target_path.suffix == ".md" and fragment not in anchors(target_path):
            broken.append(f"{target}: no heading #{fragment} in {target_path.name}")
    assert not broken, "\n".join(broken)


def test_anchor_rules() -> None:
    """The anchor function itself can fail: GitHub's form of a few headings of ours."""
    assert anchor("Engine (`inference/`)") == "engine-inference"
    assert anchor("Limits on the DICOM port") == "limits-on-the-dicom-port"
    assert anchor("4.2.1.3 Association Acceptance Policy") == "4213-association-acceptance-policy"
    bad = REPO / "test-output" / "docs-link-check.md"
    bad.parent.mkdir(exist_ok=True)
    bad.write_text("# Title\n\nSee [there](#nowhere) and [file](missing.md).\n")
    assert links(bad) == ["#nowhere", "missing.md"]
    assert "nowhere" not in anchors(bad) and "title" in anchors(bad)


# ---- the conformance statement is the code's ---------------------------------------------------------------

CONFORMANCE = REPO / "docs" / "conformance-statement.md"


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n#", start + len(heading))
    return text[start : end if end != -1 else len(text)]


def test_conformance_statement_lists_what_the_scp_accepts() -> None:
    from pynetdicom.sop_class import Verification

    from dicom_node.net.scp import build_ae
    from dicom_node.net.transfer_syntaxes import accepted_transfer_syntaxes
    from dicom_node.settings import Settings

    text = CONFORMANCE.read_text()
    ae = build_ae(Settings())
    storage = {str(cx.abstract_syntax) for cx in ae.supported_contexts} - {str(Verification)}
    listed = re.findall(r"^\| [^|]+ \| `([\d.]+)` \|$", _section(text, "### 8.5 Storage SOP classes accepted"), re.M)
    assert len(listed) == len(set(listed)) and set(listed) == storage
    syntaxes = re.findall(r"^\| [^|]+ \| `([\d.]+)` \| \w+ \|$", _section(text, "### 8.6 Transfer syntaxes accepted"), re.M)
    assert syntaxes == [str(uid) for uid in accepted_transfer_syntaxes()]  # the same order: our preference
    for cx in ae.supported_contexts:  # every storage class gets the same list
        if str(cx.abstract_syntax) != str(Verification):
            assert [str(uid) for uid in cx.transfer_syntax] == syntaxes, cx.abstract_syntax


def test_conformance_statement_defaults_and_objects_are_the_codes() -> None:
    from dicom_node.settings import Settings
    from sr_writer.kinds import KINDS

    text = CONFORMANCE.read_text()
    settings = Settings()
    configuration = _section(text, "### 4.4 Configuration")
    assert f"| `{settings.node.ae_title}` | {settings.node.port} (plain), {settings.tls.port} (TLS" in configuration
    policies = _section(text, "##### 4.2.1.2 Association policies")
    assert f"| {settings.node.max_pdu:,} bytes" in policies
    assert f"| at most {settings.limits.max_associate_rq_bytes:,} bytes" in policies
    assert f"| {settings.limits.establish_timeout_s:g} s," in policies
    assert f"| {settings.node.network_timeout_s:g} s;" in policies
    assert f"| {settings.delivery.timeout_s:g} s |" in policies
    assert f"| {settings.limits.max_connections} | `limits.max_connections` |" in policies
    assert f"| {settings.limits.reserved_connections} | `limits.reserved_connections` |" in policies
    assert f"| {settings.limits.max_connections_per_host} | `limits.max_connections_per_host` |" in policies
    objects = _section(text, "### 8.1 IOD contents of the created objects")
    rows = dict(re.findall(r"^\| `(\w+)` \|.*\| (\d+, \"[^\"]+\") \|$", objects, re.M))
    assert rows == {name: f'{kind.series_number}, "{kind.title}"' for name, kind in KINDS.items()}
