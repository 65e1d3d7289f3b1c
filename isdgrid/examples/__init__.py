"""Worked examples that run on a grid (the ``isdgrid demo`` command uses them).

- :mod:`isdgrid.examples.replica_exchange`: a parallel-tempering Monte Carlo driver.
- :mod:`isdgrid.examples.boltzmann`: the exact distribution of its model and the
  statistical check of the sampled one.
- :mod:`isdgrid.examples.openmm_tempering`, :mod:`~isdgrid.examples.openmm_peptide`,
  :mod:`~isdgrid.examples.openmm_demo`: temperature replica exchange of alanine dipeptide
  with OpenMM (``isdgrid demo --engine openmm``; needs ``isdgrid[openmm]``).
"""
