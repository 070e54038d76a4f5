"""Importing trainer or retrieval picks TensorFlow's BFC CPU allocator unless told otherwise."""

import os
import subprocess
import sys

import pytest

_PRINT_SETTING = "import os, {pkg}; print(os.environ.get('TF_CPU_ALLOCATOR_USE_BFC'))"


def _setting_after_import(pkg: str, preset: str | None) -> str:
  env = {k: v for k, v in os.environ.items() if k != "TF_CPU_ALLOCATOR_USE_BFC"}
  if preset is not None:
    env["TF_CPU_ALLOCATOR_USE_BFC"] = preset
  out = subprocess.run([sys.executable, "-c", _PRINT_SETTING.format(pkg=pkg)], env=env,
                       capture_output=True, text=True, check=True)
  return out.stdout.strip()


@pytest.mark.parametrize("pkg", ["trainer", "retrieval"])
def test_bfc_allocator_is_the_default(pkg):
  assert _setting_after_import(pkg, None) == "true"


def test_a_user_setting_wins():
  assert _setting_after_import("trainer", "false") == "false"
