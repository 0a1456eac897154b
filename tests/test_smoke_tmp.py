def test_db(database, backend):
    with database.connect() as c:
        assert c.execute("select 1").fetchone()[0] == 1
    assert database.view.connections_opened() == 0
    import psycopg
    with psycopg.connect(database.url) as c:
        assert len(database.view.sessions()) == 1
    assert database.view.connections_opened() == 1
