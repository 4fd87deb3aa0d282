"""Reports: sections (verdicts, Markdown text, PNG charts) rendered as one self-contained HTML page and Markdown.

A pure function from results to files: every experiment and analysis writes a `section.json`, and
`tunegap report DIR` gathers them. The HTML embeds its images as base64 so it opens offline anywhere.
"""

from __future__ import annotations

import base64
import html
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ConfigError
from .io import DamagedFileError, atomic_write_json, atomic_write_text, read_json, read_jsonl, write_figure
from .stats import NOT_RESOLVED


@dataclass
class Verdict:
    claim: str
    measured: str
    supported: bool | None  # None: a trade-off or not decidable from this measurement
    note: str = ""
    anchor: dict | None = None  # the published counterpart (tunegap.literature.Anchor.beside): paper, where, finding
    unresolved: bool = False  # supported is None because the seeds' interval straddles the rule's threshold

    @property
    def label(self) -> str:
        return verdict_label(self.supported, self.unresolved)


def verdict_label(supported: bool | None, unresolved: bool = False) -> str:
    """The one wording of a verdict's outcome (report, markdown and every command's printout)."""
    if supported is None and unresolved:
        return NOT_RESOLVED
    return {True: "supported", False: "not supported", None: "it depends"}[supported]


@dataclass
class Section:
    title: str
    verdicts: list = field(default_factory=list)
    body_markdown: str = ""
    images: list = field(default_factory=list)
    order: int = 50  # place in a gathered report, smaller first (the gap experiment, then the analyses)

    def to_dict(self) -> dict:
        return {"title": self.title, "verdicts": [asdict(v) for v in self.verdicts],
                "body_markdown": self.body_markdown, "images": [str(Path(p).name) for p in self.images],
                "order": self.order}

    @classmethod
    def from_dict(cls, data: dict, folder: Path) -> "Section":
        """A section as `to_dict` wrote it; each image must be a file of `folder` itself (by name), so a
        section.json that names `../../secret.txt` or a link cannot put another file into the report."""
        title, body, order = data.get("title"), data.get("body_markdown", ""), data.get("order", 50)
        verdicts, images = data.get("verdicts", []), data.get("images", [])
        if not isinstance(title, str) or not isinstance(body, str):
            raise ValueError("'title' and 'body_markdown' must be strings")
        if isinstance(order, bool) or not isinstance(order, (int, float)) or order != order:
            raise ValueError(f"'order' must be a number, got {order!r}"[:120])
        if not isinstance(verdicts, list) or not isinstance(images, list):
            raise ValueError("'verdicts' and 'images' must be lists")
        return cls(title=title, verdicts=[_verdict(v) for v in verdicts], body_markdown=body,
                   images=[image_inside(folder, name) for name in images], order=int(order))

    def save(self, folder: str | Path) -> Path:
        """`folder/section.json`; images are stored by file name, so they must live in `folder`."""
        path = Path(folder) / "section.json"
        atomic_write_json(path, self.to_dict())
        return path


def _verdict(data) -> Verdict:
    fields = {"claim": str, "measured": str, "note": str}
    anchor_keys = {"paper", "where", "finding", "comparison"}
    if not isinstance(data, dict) or set(data) - {*fields, "supported", "anchor", "unresolved"} \
            or not {"claim", "measured"} <= set(data):
        raise ValueError("each verdict must be an object with 'claim', 'measured', 'supported', 'note' and "
                         "optionally 'anchor'")
    if any(not isinstance(data[k], kind) for k, kind in fields.items() if k in data) \
            or data.get("supported") not in (True, False, None) or data.get("unresolved", False) not in (True, False):
        raise ValueError("a verdict's claim, measured and note must be strings, 'supported' true, false or null, "
                         "'unresolved' true or false")
    anchor = data.get("anchor")
    if anchor is not None and (not isinstance(anchor, dict) or not anchor_keys <= set(anchor)
                               or any(not isinstance(anchor[k], str) for k in anchor_keys)):
        raise ValueError("a verdict's anchor must be an object of strings: paper, where, finding, comparison")
    return Verdict(**data)


def image_inside(folder: Path, name) -> Path:
    """`folder/name` for a plain file name of a regular file there; anything else (a path, `..`, a link,
    a missing file) is refused: a report inlines its images, so it would publish whatever they point at."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"image {name!r}: must be the name of a file in {folder}"[:200])
    path = folder / name
    if path.is_symlink() or not path.is_file() or path.resolve().parent != folder.resolve():
        raise ValueError(f"image {name!r}: not a regular file in {folder} (links are refused)"[:200])
    return path


def _inline(text: str) -> str:
    """Escape, then the few inline Markdown forms our sections use: **bold**, `code`."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def markdown_to_html(markdown: str) -> str:
    """Paragraphs, pipe tables, block quotes and fenced code: the subset the sections are written in.

    Hand-written because these few forms are all we emit, and a Markdown dependency would add little.
    """
    out, lines, i = [], markdown.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append("<pre>" + html.escape("\n".join(lines[i + 1:j])) + "</pre>")
            i = j + 1
        elif line.startswith("|"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            rows = [[c.strip() for c in r.strip().strip("|").split("|")] for r in lines[i:j]]
            body = [r for r in rows[1:] if not all(set(c) <= set("-: ") for c in r)]
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in rows[0]) + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</tbody></table>")
            i = j
        elif line.startswith("> "):
            out.append(f"<blockquote>{_inline(line[2:])}</blockquote>")
            i += 1
        elif line.startswith("- "):
            j = i
            while j < len(lines) and lines[j].startswith("- "):
                j += 1
            out.append("<ul>" + "".join(f"<li>{_inline(r[2:])}</li>" for r in lines[i:j]) + "</ul>")
            i = j
        elif line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 2, 6)  # inside a section (<h2>)
            out.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
            i += 1
        elif line.strip():
            j = i
            while j < len(lines) and lines[j].strip() and not lines[j].startswith(("|", "```", "> ", "- ", "#")):
                j += 1
            out.append("<p>" + _inline(" ".join(lines[i:j])) + "</p>")
            i = j
        else:
            i += 1
    return "\n".join(out)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f4f4f4}img{max-width:100%;border:1px solid #eee;margin:.5em 0}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;white-space:pre-wrap}
blockquote{border-left:4px solid #ccc;margin:0;padding-left:1em;color:#555}
.anchor{font-size:.85em;color:#444}.v-supported{color:#116611;font-weight:bold}.v-not{color:#aa1111;font-weight:bold}.v-depends{color:#aa6600;font-weight:bold}
"""


def anchor_text(anchor: dict | None) -> str:
    """One cell: the published result beside a verdict, and how tunegap's result relates to it."""
    if not anchor:
        return "none cited"
    return f"{anchor['paper']}, {anchor['where']}: {anchor['finding']}. {anchor['comparison']}"


def _verdict_table(verdicts: list[Verdict]) -> str:
    if not verdicts:
        return ""
    css = {True: "v-supported", False: "v-not", None: "v-depends"}
    rows = "".join(
        f"<tr><td>{html.escape(v.claim)}</td><td>{_inline(v.measured)}</td>"
        f"<td class='{css[v.supported]}'>{v.label}</td><td>{html.escape(v.note)}</td>"
        f"<td class='anchor'>{html.escape(anchor_text(v.anchor))}</td></tr>" for v in verdicts)
    return ("<table class='verdicts'><thead><tr><th>claim (essay)</th><th>measured</th><th>verdict</th>"
            f"<th>note</th><th>published result</th></tr></thead><tbody>{rows}</tbody></table>")


def render_html(sections: list[Section], title: str) -> str:
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for s in sections:
        parts.append(f"<section><h2>{html.escape(s.title)}</h2>")
        parts.append(_verdict_table(s.verdicts))
        parts.append(markdown_to_html(s.body_markdown))
        for image in s.images:
            data = base64.b64encode(Path(image).read_bytes()).decode()
            parts.append(f"<figure><img alt='{html.escape(Path(image).stem)}' src='data:image/png;base64,{data}'>"
                         f"</figure>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(sections: list[Section], title: str, relative_to: str | Path | None = None) -> str:
    """Images are linked by file name, or relative to `relative_to` (a gathered report's folder) when given."""
    def link(p) -> str:
        return Path(os.path.relpath(Path(p).resolve(), Path(relative_to).resolve())).as_posix() if relative_to \
            else Path(p).name

    parts = [f"# {title}", ""]
    for s in sections:
        parts += [f"## {s.title}", ""]
        if s.verdicts:
            parts += ["| claim (essay) | measured | verdict | note | published result |", "|---|---|---|---|---|"]
            parts += [f"| {v.claim} | {v.measured} | **{v.label}** | {v.note} | {anchor_text(v.anchor)} |"
                      for v in s.verdicts]
            parts.append("")
        parts += [s.body_markdown, ""]
        parts += [f"![{Path(p).stem}]({link(p)})" for p in s.images]
        parts.append("")
    return "\n".join(parts)


def write_report(folder: str | Path, sections: list[Section], title: str = "tunegap report") -> Path:
    """report.html + report.md (+ section.json when there is one section) in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if len(sections) == 1:
        atomic_write_json(folder / "section.json", sections[0].to_dict())
    atomic_write_text(folder / "report.md", render_markdown(sections, title))
    atomic_write_text(folder / "report.html", render_html(sections, title))
    return folder / "report.html"


def gather_sections(root: str | Path) -> list[Section]:
    """Every section.json under `root` (experiments and analyses), by `order`, then path."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    sections = []
    for p in sorted(root.rglob("section.json")):
        try:
            sections.append(Section.from_dict(read_json(p, what="section file"), p.parent))
        except DamagedFileError:
            raise
        except (ValueError, KeyError, TypeError) as err:  # a user error: one line, exit 2
            raise ConfigError(f"{p}: not a section file: {str(err).splitlines()[0]}") from None
    return sorted(sections, key=lambda s: s.order)  # stable: path order within equal `order`


def run_sections(root: Path, charts: Path) -> list[Section]:
    """A section per training run under `root` (the folder itself, or its sub-folders: a runs folder), with
    its ledger's totals and its loss curve drawn from metrics.jsonl into `charts`."""
    folders = [root] if (root / "ledger.json").is_file() else sorted(
        p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and (p / "ledger.json").is_file())
    sections = []
    for folder in folders:
        ledger = read_json(folder / "ledger.json", what="run ledger")
        rows = [r for r in read_jsonl(folder / "metrics.jsonl") if _finite(r.get("step")) and _finite(r.get("loss"))]
        images = [_loss_chart(folder.name, rows, charts / f"{folder.name}.loss.png")] if rows else []
        sections.append(Section(f"Run {folder.name}", body_markdown=_run_summary(ledger, rows), images=images,
                                order=100))
    return sections


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) != float("inf")


def _run_summary(ledger: dict, rows: list[dict]) -> str:
    costs = ledger.get("costs") if isinstance(ledger.get("costs"), dict) else {}

    def cost(key: str, unit: str) -> str:
        item = costs.get(key)
        if not isinstance(item, dict) or not _finite(item.get("value")):
            return "-"
        return f"{item['value']:,.4g} {unit} ({item.get('how', 'measured')})"

    method = ledger.get("method", {}).get("name") if isinstance(ledger.get("method"), dict) else None
    config = ledger.get("config") if isinstance(ledger.get("config"), dict) else {}
    lines = ["| field | value |", "|---|---|", f"| status | {ledger.get('status', '-')} |", f"| method | {method or '-'} |",
             f"| model | {config.get('model', '-')} |", f"| optimizer steps | {cost('optimizer_steps', 'steps')} |",
             f"| tokens | {cost('tokens', 'tokens')} |", f"| FLOPs | {cost('flops_total', 'FLOP')} |",
             f"| wall time | {cost('wall_time_s', 's')} |"]
    if rows:
        lines.append(f"| last training loss | {rows[-1]['loss']:.4f} nats/token (measured, step {rows[-1]['step']}) |")
    return "\n".join(lines)


def _loss_chart(name: str, rows: list[dict], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="#3a7")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token, measured)")
    ax.set_title(name)
    fig.tight_layout()
    return write_figure(fig, path)


def write_gathered_report(root: str | Path, out: str | Path | None = None,
                          title: str = "tunegap: why fine-tuning is cheap, measured") -> tuple[Path, list[Section]]:
    """`tunegap report ROOT`: every section under ROOT in one report.html + report.md (no section.json written,
    so gathering again does not find the report itself)."""
    root = Path(root)
    sections = gather_sections(root)
    out = Path(out) if out else root
    if not sections:  # plain training runs: a section per run, with its loss curve
        sections = run_sections(root, out / "report-charts")
    if not sections:
        raise ConfigError(f"{root}: no section.json and no training run (ledger.json) in it; nothing to report")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.md", render_markdown(sections, title, relative_to=out))
    atomic_write_text(out / "report.html", render_html(sections, title))
    return out / "report.html", sections


def cmd_report(args) -> int:
    path, sections = write_gathered_report(args.folder, args.out or None, args.title)
    print(f"tunegap report: {len(sections)} section(s) under {args.folder} -> {path} (and report.md)")
    for s in sections:
        for v in s.verdicts:
            print(f"  [{v.label}] {s.title}: {v.claim} ({v.measured})")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("report", help="gather every analysis and experiment under a folder into one page")
    p.add_argument("folder", nargs="?", default="results", help="searched at any depth for section.json")
    p.add_argument("--out", default="", help="folder for report.html and report.md (default: the folder itself)")
    p.add_argument("--title", default="tunegap: why fine-tuning is cheap, measured")
    p.set_defaults(func=cmd_report)
