"""The course's machinery, one concern per module; ``cnn_utils`` (beside this package) is
the module a student reads and re-exports what notebooks use. See ``cnn_utils``'s docstring
for the map, and ARCHITECTURE.md for the direction of imports."""
