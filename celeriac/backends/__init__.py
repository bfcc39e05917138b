"""Result stores: the contract (:mod:`celeriac.backends.base`) and one module per store."""
