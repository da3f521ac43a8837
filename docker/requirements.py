"""Prints the project's requirements, with those of the extras named in argv[1] (comma-separated), from
pyproject.toml in the current folder: the image's dependency layer installs them before the source
is copied (Dockerfile), so it needs nothing of the project but this list."""

import sys
import tomllib

with open("pyproject.toml", "rb") as file:
    project = tomllib.load(file)["project"]
extras = [name for name in (sys.argv[1] if len(sys.argv) > 1 else "").split(",") if name]
optional = project.get("optional-dependencies", {})
print("\n".join(project["dependencies"] + [r for extra in extras for r in optional[extra]]))
