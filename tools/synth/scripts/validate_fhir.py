#!/usr/bin/env python3
"""Validate FHIR NDJSON files with the `fhir.resources` models (R4B, the R4 technical
correction: the resources used here are unchanged from R4).

Usage: validate_fhir.py FILE.ndjson...   Exit 0 if every line is a valid resource of the
type its file is named after; otherwise print the first errors (resource type, line,
validator message - never the resource itself) and exit 1.
"""
import importlib
import json
import pathlib
import sys


def main(paths):
    checked, failures = 0, []
    for path in map(pathlib.Path, paths):
        kind = path.name.split(".")[0]
        module = importlib.import_module(f"fhir.resources.R4B.{kind.lower()}")
        model = getattr(module, kind)
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                data = json.loads(line)
                if data.get("resourceType") != kind:
                    failures.append(f"{path.name}:{number}: resourceType is not {kind}")
                    continue
                try:
                    model.model_validate(data)
                except Exception as e:  # pydantic.ValidationError, with field paths
                    failures.append(f"{path.name}:{number}: {str(e).splitlines()[0:3]}")
                checked += 1
    print(f"validated {checked} resources, {len(failures)} invalid")
    for f in failures[:20]:
        print(f)
    return 1 if failures or checked == 0 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
