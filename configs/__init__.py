# Data only: model registry, presets and training recipes as TOML. This file makes the
# folder installable as `maest_cli.configs` (see pyproject.toml), so wheels carry it.
