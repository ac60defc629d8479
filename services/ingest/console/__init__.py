"""The operator console: the seller's CRM on one screen, served by ingest at `/console/`.

Server-rendered pages (Jinja2), a little htmx for partial updates, and Apache ECharts for
the charts; every asset is served from this package (`static/`), nothing from a CDN.
Why server-rendered: the console is a view over the public API with the operator's own
key, so rendering on the server keeps the key there (never in the browser, never in a
URL), keeps one language (Python) and one test stack, and needs no front-end build.

Security:
- Sign-in with a shop key (or the admin key naming a shop) creates a session: a random
  token in an HttpOnly, SameSite=Strict cookie (`Secure` behind HTTPS); the key is stored
  server-side only, encrypted (AES-GCM under a key derived from `HUITOU_ADMIN_KEY`), in
  ingest's `console_sessions` table, for 12 hours.
- Every form and every htmx request carries the session's CSRF token (a hidden field, or
  the `X-CSRF-Token` header htmx adds); the sign-in form a pre-session one (double submit).
- Every page is sent with a Content-Security-Policy without inline script or style.
- The console calls the services' public routes with the session's key, so it sees
  exactly what that key's shop may see.
"""
