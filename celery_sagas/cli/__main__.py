from celery_sagas.cli import main

main()
