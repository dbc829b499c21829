"""`python -m benchmarks --robustness`: hostile files and clients, overload, slow clients, SIGTERM under
load and interference, and the robustness targets and report."""
