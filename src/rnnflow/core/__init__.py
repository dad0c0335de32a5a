"""The ground floor: errors, atomic writes, paths, params (the schema and the registry of
variants) and plots. Imports no other room of rnnflow."""
