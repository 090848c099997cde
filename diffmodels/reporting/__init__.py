"""Pages and figures: the report and compare pages (jinja2 templates), figures, offline vega plots."""
