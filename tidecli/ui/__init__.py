"""Everything rich: progress bars, the live diffusion view, tables. The engine never imports it."""
