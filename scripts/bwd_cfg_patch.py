"""pytest plugin for GPU experiments: ``-p bwd_cfg_patch`` with ``BWD_CFG='d:BLOCK_M,BLOCK_N,stages,...;...'``
replaces the Gluon backward's shipped configs (``attn_bwd_gluon._CONFIGS``) for the whole run, so that the
suite checks a candidate before it ships. PYTHONPATH must include scripts/."""

import os

from ioattn.kernels import attn_bwd_gluon

for item in filter(None, os.environ.get("BWD_CFG", "").split(";")):
    d, spec = item.split(":")
    attn_bwd_gluon._CONFIGS[int(d)] = attn_bwd_gluon.BwdConfig(*(int(x) for x in spec.split(",")))
