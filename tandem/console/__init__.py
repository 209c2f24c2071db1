"""The web console `tandem serve` serves at `/`: AI drawing, playgrounds, models and metrics.

Plain HTML, CSS and JavaScript modules under `static/`, packaged with Tandem (no build step). The
page and its assets are public and hold no data; everything they show comes from the server's own
API routes (the same ones clients call), which check keys like any other request: the page asks
for the key and sends it as `Authorization: Bearer`. `routes.py` adds the routes.
"""
