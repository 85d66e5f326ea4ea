#!/usr/bin/env python3
"""Make data/neurips-2023-posters.html, the compact NeurIPS 2023 snapshot bundled in the binary.

It keeps only the poster links of the saved schedule page (../shared/data/neurips/
virtual-2023-schedule.html), in page order, each title's whitespace folded and duplicates dropped,
so `scrape` finds the same titles in the same order from either file (tests/it/scrape.rs checks it).

    python3 scripts/compact-snapshot.py [SAVED_PAGE] [OUT]
"""
import html
import sys
from html.parser import HTMLParser

PREFIX = "/virtual/2023/poster/"


class Links(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.depth, self.cur, self.out = 0, None, []

    def handle_starttag(self, tag, attrs):
        if tag != "a":
            return
        href = dict(attrs).get("href") or ""
        if self.cur is None and href.startswith(PREFIX):
            self.cur, self.depth = [href, []], 1
        elif self.cur is not None:
            self.depth += 1

    def handle_endtag(self, tag):
        if tag == "a" and self.cur is not None:
            self.depth -= 1
            if self.depth == 0:
                self.out.append((self.cur[0], " ".join("".join(self.cur[1]).split())))
                self.cur = None

    def handle_data(self, data):
        if self.cur is not None:
            self.cur[1].append(data)


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/neurips/virtual-2023-schedule.html"
    out = sys.argv[2] if len(sys.argv) > 2 else "data/neurips-2023-posters.html"
    p = Links()
    with open(src, encoding="utf-8") as f:
        p.feed(f.read())
    seen, rows = set(), []
    for href, title in p.out:
        if title and title not in seen:
            seen.add(title)
            rows.append((href, title))
    with open(out, "w", encoding="utf-8") as f:
        f.write('<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
                "<title>NeurIPS 2023 posters (compact snapshot)</title></head><body>\n")
        f.write("<!-- The poster links of https://neurips.cc/virtual/2023/papers.html in page order, "
                "duplicates removed: the offline fallback and the quick preset's source. Made from "
                "the saved schedule page by scripts/compact-snapshot.py. -->\n<ul>\n")
        for href, title in rows:
            f.write(f'<li><a href="{html.escape(href)}">{html.escape(title, quote=False)}</a></li>\n')
        f.write("</ul>\n</body></html>\n")
    print(f"{out}: {len(rows)} titles")


if __name__ == "__main__":
    main()
