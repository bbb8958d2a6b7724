"""`gpud ui` (SPEC §15): a live web page of the box, served by a small aiohttp server that is a client of the
control API. security.py, routes.py and text.py are pure; control.py, live.py and server.py do the I/O;
static/ holds the page (plain HTML, CSS and JavaScript modules: no build step, nothing from outside)."""
