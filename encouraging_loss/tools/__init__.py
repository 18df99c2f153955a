"""The tools around experiments, framework-free (no fairseq, no timm):

* :mod:`~encouraging_loss.tools.results`: result records -> CSV, Markdown and
  plots (``el-results``);
* :mod:`~encouraging_loss.tools.analysis`: margins, energies, calibration, OOD
  detection, linear probe, the report files;
* :mod:`~encouraging_loss.tools.data`: fetch, verify and locate the test and
  benchmark data (``el-data``);
* :mod:`~encouraging_loss.tools.benchmark`: the loss's speed and memory against
  cross-entropy (``el-benchmark``);
* :mod:`~encouraging_loss.tools.kernel_sass`: the Triton kernels' sm_90 machine
  code per element (``el-kernel-sass``);
* :mod:`~encouraging_loss.tools.cli` and :mod:`~encouraging_loss.tools.files`:
  what every command shares (one-line usage errors, atomic writes, safe
  checkpoint reads).
"""
