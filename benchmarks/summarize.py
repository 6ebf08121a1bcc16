"""Markdown table of a pytest-benchmark JSON file, with each row's median as a ratio to the
slowest-named baseline of its group (the first row whose name matches --baseline).

    python benchmarks/summarize.py out.json --baseline copy_floor
"""

import argparse
import json
from collections import defaultdict


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("json_file")
    parser.add_argument("--baseline", default="copy_floor", help="substring naming each group's baseline row")
    args = parser.parse_args()
    with open(args.json_file) as f:
        data = json.load(f)
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"]].append(b)
    for group, rows in groups.items():
        base = next((r for r in rows if args.baseline in r["name"]), None)
        print(f"\n### {group}\n")
        print("| benchmark | median (ms) | IQR (ms) | × baseline |")
        print("| --- | ---: | ---: | ---: |")
        for r in sorted(rows, key=lambda r: r["stats"]["median"]):
            med = r["stats"]["median"] * 1e3
            ratio = f"{r['stats']['median'] / base['stats']['median']:.2f}" if base else "-"
            print(f"| {r['name']} | {med:.2f} | {r['stats']['iqr'] * 1e3:.2f} | {ratio} |")
    machine = data.get("machine_info", {})
    print(f"\nmachine: {machine.get('cpu', {}).get('brand_raw', '?')}, {machine.get('cpu', {}).get('count', '?')} cpus")


if __name__ == "__main__":
    main()
