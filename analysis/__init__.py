"""Pure metric functions over accuracy matrices and curves, tables, plots and reports."""
