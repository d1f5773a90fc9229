"""The kernel-ridge family: kernel ridge regression (``krr``), the model pool (``pool``), the shared outer step
(``base``) and its methods ``krr-st``, ``paa`` and ``frepo``."""
