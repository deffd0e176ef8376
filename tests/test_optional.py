"""`mtrl_jax.optional.require`: optional dependencies imported on first use, with an error that
says how to install them."""

import json

import pytest

from mtrl_jax.optional import require


def test_require_returns_the_module_itself():
  assert require("json") is json
  import email.mime.text
  assert require("email.mime.text") is email.mime.text  # the submodule, not the package


def test_missing_module_names_the_extra():
  with pytest.raises(ImportError, match=r'no_such_module_mtrl is needed .*pip install -e "\.\[hf\]"'):
    require("no_such_module_mtrl")
  with pytest.raises(ImportError, match=r"json\.no_such_sub is needed"):
    require("json.no_such_sub")


def test_callers_use_it():
  from mtrl_jax.models import chat, hf
  assert chat.require is require and hf.require is require
