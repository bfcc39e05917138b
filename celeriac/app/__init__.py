"""The application layer: app, configuration, tasks, calling, results, signatures."""
