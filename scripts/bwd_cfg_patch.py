"""pytest plugin for GPU experiments: ``-p bwd_cfg_patch`` with ``BWD_CFG='d:BLOCK_M,BLOCK_N,stages,...;...'``
makes the Gluon backward run that config for every call at head dim d (``attn_bwd_gluon.select_config``), so
that the suite checks a candidate before it ships. PYTHONPATH must include scripts/."""

import os

from ioattn.kernels import attn_bwd_gluon

_FORCED = {}
for item in filter(None, os.environ.get("BWD_CFG", "").split(";")):
    d, spec = item.split(":")
    _FORCED[int(d)] = attn_bwd_gluon.BwdConfig.parse(spec)
_shipped = attn_bwd_gluon.select_config


def _select(d, *args, **kwargs):
    return _FORCED[d] if d in _FORCED else _shipped(d, *args, **kwargs)


attn_bwd_gluon.select_config = _select
