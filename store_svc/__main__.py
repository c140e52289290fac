"""`python -m store_svc` runs the store service."""

from store_svc.main import main

if __name__ == "__main__":
    main()
