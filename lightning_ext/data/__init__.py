"""Offline DataModules every family uses: scikit-learn digits and tabular sets, Fashion-MNIST, MNIST 5k, and the
:class:`~lightning_ext.data.base.InMemoryDataModule` base with fixed, seeded splits."""
