"""Rebuild the embedded multi-domain corpus (data/corpus/*.txt) from redistributable sources.

Domains and sources (licenses in data/README.md):
  code        Python standard library modules (PSF-2.0), from the running interpreter's stdlib
  prose       The Debian Administrator's Handbook, English (GPL-2.0+ or CC-BY-SA-3.0) and the Jargon File
              4.4.7 (public domain), from the Debian packages `debian-handbook` and `jargon-text`
  french, spanish, german
              The Debian Administrator's Handbook, French, Spanish and German translations (GPL-2.0+ or
              CC-BY-SA-3.0); paragraphs the translations left in English are dropped
  numbers     arithmetic, sequences and tables generated here (seeded)
  structured  JSON records and CSV tables generated here (seeded)

Each domain is cut into documents; every 20th document goes to `<domain>.heldout.txt`, the rest to
`<domain>.train.txt`. Documents are separated by a blank line plus a form feed so they can be split again.

    apt-get download debian-handbook jargon-text && for d in *.deb; do dpkg-deb -x $d pkgs; done
    python data/corpus/build.py --packages pkgs
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html.parser
import json
import random
import re
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEPARATOR = "\n\f\n"
HELDOUT_EVERY = 20
BUDGET = {"code": 2_500_000, "prose": 2_500_000, "french": 1_000_000, "spanish": 1_000_000, "german": 1_000_000,
          "numbers": 800_000, "structured": 800_000}
# frequent function words, to tell a translated paragraph from one left in English
STOPWORDS = {
    "en-US": {"the", "and", "of", "to", "is", "in", "that", "for", "with", "this", "are", "it", "be", "you"},
    "fr-FR": {"le", "la", "les", "des", "et", "est", "une", "un", "du", "pour", "dans", "que", "sur", "avec", "qui"},
    "es-ES": {"el", "la", "los", "las", "de", "y", "es", "una", "un", "del", "para", "en", "que", "con", "por"},
    "de-DE": {"der", "die", "das", "und", "ist", "ein", "eine", "nicht", "mit", "für", "den", "von", "zu", "auf"},
}


class _Text(html.parser.HTMLParser):
    """Visible text of an HTML page, one paragraph per block element; navigation and scripts dropped."""

    BLOCKS = {"p", "div", "li", "pre", "h1", "h2", "h3", "h4", "tr", "dt", "dd", "br", "table"}
    SKIP = {"script", "style", "head", "nav"}

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def html_paragraphs(path: Path) -> list[str]:
    parser = _Text()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    text = "".join(parser.parts)
    paras = [re.sub(r"[ \t\r]+", " ", p).strip() for p in re.split(r"\n\s*\n|\n", text)]
    return [p for p in paras if len(p) > 40]


def in_language(paragraph: str, lang: str) -> bool:
    """More of `lang`'s function words than English ones (always true for English)."""
    if lang == "en-US":
        return True
    words = re.findall(r"\w+", paragraph.lower())
    return sum(w in STOPWORDS[lang] for w in words) > sum(w in STOPWORDS["en-US"] for w in words)


def handbook(root: Path, lang: str) -> list[str]:
    """One document per chapter page of the handbook in `lang` (its paragraphs in that language), in name order."""
    folder = root / "usr/share/doc/debian-handbook/html" / lang
    return ["\n".join(p for p in html_paragraphs(f) if in_language(p, lang))
            for f in sorted(folder.glob("*.html")) if f.name != "index.html"]


def jargon(root: Path) -> list[str]:
    """The Jargon File's entries, grouped 40 to a document."""
    text = gzip.open(root / "usr/share/doc/jargon-text/jargon.txt.gz", "rt", encoding="utf-8", errors="replace").read()
    entries = [e.strip() for e in re.split(r"\n(?=\S[^\n]*\n\n)", text) if len(e.strip()) > 40]
    return ["\n\n".join(entries[i:i + 40]) for i in range(0, len(entries), 40)]


def stdlib_code() -> list[str]:
    """Top-level stdlib modules, one document each, tests and generated tables excluded."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for f in sorted(stdlib.glob("*.py")):
        text = f.read_text(encoding="utf-8", errors="replace")
        if not f.name.startswith(("_", "test")) and 2_000 < len(text) < 200_000:
            docs.append(f"# file: {f.name}\n{text}")
    return docs


def numbers(rng: random.Random, n_docs: int = 1000) -> list[str]:
    """Arithmetic with results, sequences, unit tables, decimals and fractions."""
    docs = []
    for _ in range(n_docs):
        lines = []
        for _ in range(rng.randint(20, 40)):
            kind = rng.randrange(7)
            a, b = rng.randint(0, 999), rng.randint(1, 999)
            if kind == 0:
                lines.append(f"{a} + {b} = {a + b}")
            elif kind == 1:
                lines.append(f"{a} - {b} = {a - b}")
            elif kind == 2:
                a, b = rng.randint(2, 99), rng.randint(2, 99)
                lines.append(f"{a} * {b} = {a * b}")
            elif kind == 3:
                q = rng.randint(2, 60)
                lines.append(f"{q * b} / {b} = {q}")
            elif kind == 4:
                start, step = rng.randint(-50, 50), rng.randint(1, 12)
                lines.append("sequence: " + ", ".join(str(start + i * step) for i in range(rng.randint(5, 10))))
            elif kind == 5:
                lines.append(f"{a}/{b} = {a / b:.6f}")
            else:
                x = rng.randint(1, 30)
                lines.append(" | ".join(f"{x} x {i} = {x * i}" for i in range(1, 6)))
        docs.append("\n".join(lines))
    return docs


FIRST = ["Ada", "Alan", "Grace", "Linus", "Margaret", "Ken", "Barbara", "Donald", "Frances", "Edsger", "Radia",
         "Dennis", "Hedy", "John", "Katherine", "Niklaus", "Sophie", "Tim", "Yukihiro", "Guido"]
LAST = ["Lovelace", "Turing", "Hopper", "Torvalds", "Hamilton", "Thompson", "Liskov", "Knuth", "Allen", "Dijkstra",
        "Perlman", "Ritchie", "Lamarr", "Backus", "Johnson", "Wirth", "Wilson", "Lee", "Matsumoto", "Rossum"]
CITIES = ["Lisbon", "Osaka", "Nairobi", "Lyon", "Quito", "Oslo", "Pune", "Perth", "Tartu", "Recife"]
ITEMS = ["widget", "gadget", "sprocket", "bracket", "valve", "sensor", "cable", "gear", "panel", "lamp"]


def structured(rng: random.Random, n_docs: int = 900) -> list[str]:
    """JSON records and CSV tables of people, orders and measurements."""
    docs = []
    for d in range(n_docs):
        if d % 2 == 0:
            records = [{"id": rng.randint(1000, 99999), "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
                        "city": rng.choice(CITIES), "active": rng.random() < 0.7,
                        "orders": [{"item": rng.choice(ITEMS), "qty": rng.randint(1, 20),
                                    "price": round(rng.uniform(0.5, 500), 2)} for _ in range(rng.randint(0, 3))]}
                       for _ in range(rng.randint(3, 8))]
            docs.append(json.dumps(records, indent=2 if d % 4 == 0 else None))
        else:
            rows = ["date,city,item,qty,unit_price,total"]
            for _ in range(rng.randint(10, 30)):
                qty, price = rng.randint(1, 50), round(rng.uniform(0.5, 99), 2)
                rows.append(f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d},{rng.choice(CITIES)},"
                            f"{rng.choice(ITEMS)},{qty},{price},{qty * price:.2f}")
            docs.append("\n".join(rows))
    return docs


def fit(docs: list[str], budget: int) -> list[str]:
    """Documents in order until the byte budget is reached."""
    out, size = [], 0
    for doc in docs:
        if size >= budget:
            break
        out.append(doc)
        size += len(doc.encode())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packages", type=Path, required=True, help="folder the Debian packages were extracted to")
    args = parser.parse_args()
    rng = random.Random(20261123)
    domains = {"code": stdlib_code(), "prose": handbook(args.packages, "en-US") + jargon(args.packages),
               "french": handbook(args.packages, "fr-FR"), "spanish": handbook(args.packages, "es-ES"),
               "german": handbook(args.packages, "de-DE"), "numbers": numbers(rng), "structured": structured(rng)}
    manifest = {"python": sys.version.split()[0], "domains": {}}
    for name, docs in domains.items():
        docs = fit([d for d in docs if d.strip()], BUDGET[name])
        held = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
        train = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
        entry = {}
        for split, part in (("train", train), ("heldout", held)):
            data = SEPARATOR.join(part).encode()
            (HERE / f"{name}.{split}.txt").write_bytes(data)
            entry[split] = {"documents": len(part), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        manifest["domains"][name] = entry
        print(f"{name:11s} train {entry['train']['bytes']:>9,} B   heldout {entry['heldout']['bytes']:>8,} B")
    (HERE / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
