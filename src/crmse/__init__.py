"""crmse: contrastive regularisation of machine-learning interatomic potentials.

Units everywhere (see :mod:`crmse.units`): Å, kcal/mol, kcal/mol/Å, fs, amu, K.
"""

__version__ = "0.1.0"
