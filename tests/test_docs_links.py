"""README.md's links into the repository: mkdocs checks the links between docs/ pages (`mkdocs build --strict`,
run by `make test`), but README.md is outside docs/, so its links to docs/X.md#anchor are checked here, with the
heading ids Python-Markdown's toc extension gives them under the project's mkdocs.yml (the ids mkdocs serves)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import markdown
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def markdown_extensions() -> tuple[list[str], dict]:
    """mkdocs.yml's markdown_extensions, as Python-Markdown takes them."""
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    names, configs = [], {}
    for entry in config.get("markdown_extensions", []):
        name, options = next(iter(entry.items())) if isinstance(entry, dict) else (entry, None)
        names.append(name)
        if options:
            configs[name] = options
    return names, configs


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])
        if tag == "img" and attrs.get("src"):
            self.links.append(attrs["src"])
        if attrs.get("id"):
            self.ids.add(attrs["id"])


def rendered(path: Path) -> _Links:
    """The links (href, src) and element ids of `path` rendered the way mkdocs renders a page (code blocks hold no
    links or headings, heading ids from the toc extension's slugs: lowercase, punctuation dropped, spaces to -)."""
    names, configs = markdown_extensions()
    html = markdown.markdown(path.read_text(encoding="utf-8"), extensions=names, extension_configs=configs)
    parser = _Links()
    parser.feed(html)
    return parser


def test_heading_ids_follow_the_toc_slug_rule(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Status: what has run on real hardware\n\n## The `csi://` source, again!\n\n"
                    "```sh\n# not a heading\n```\n", encoding="utf-8")
    assert rendered(page).ids == {"status-what-has-run-on-real-hardware", "the-csi-source-again"}


def test_readme_links_into_the_repository_reach_a_file_and_a_heading():
    readme = rendered(REPO / "README.md")
    local = [link for link in readme.links if not urlsplit(link).scheme and not link.startswith("//")]
    assert any(re.match(r"docs/\w+\.md#", link) for link in local), local  # the check below has links to check
    broken = []
    for link in local:
        parts = urlsplit(link)
        target = (REPO / unquote(parts.path)).resolve() if parts.path else REPO / "README.md"
        if not target.is_file():
            broken.append(f"{link}: no file {target.relative_to(REPO)}")
        elif parts.fragment and target.suffix == ".md":
            ids = readme.ids if target == REPO / "README.md" else rendered(target).ids
            if parts.fragment not in ids:
                broken.append(f"{link}: {target.relative_to(REPO)} has no heading #{parts.fragment} "
                              f"(its ids: {', '.join(sorted(ids))})")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("text, href", [("[x](docs/tensorrt.md#status)", "docs/tensorrt.md#status"),
                                        ("![x](docs/pix2pix_samples.png)", "docs/pix2pix_samples.png")])
def test_links_and_images_are_both_collected(tmp_path, text, href):
    page = tmp_path / "page.md"
    page.write_text(text + "\n\n```md\n[not a link](nowhere.md)\n```\n", encoding="utf-8")
    assert rendered(page).links == [href]
