"""Operations API (issue 10): HTTP service, accounts and roles, health and Prometheus metrics."""
