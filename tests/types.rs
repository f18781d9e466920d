//! Text round trip of many PostgreSQL types through the whole pipeline: blue's walsender prints
//! each value, green parses it back; inserts, full and partial updates, deletes, keyless tables
//! matched on their full old row, and TOASTed values left unchanged by an update.

mod common;

use std::time::Duration;

use common::*;
use shadowsync::pipeline::{self, RunOptions};
use tokio_postgres::Client;

const DEADLINE: Duration = Duration::from_secs(60);

/// Columns shared by `types_pk` (primary key, default replica identity) and `types_full`
/// (no key, REPLICA IDENTITY FULL).
const COLUMNS: &str = "
    c_int2 int2, c_int4 int4, c_int8 int8,
    c_num numeric, c_num_s numeric(24,4),
    c_f4 float4, c_f8 float8,
    c_text text, c_vc varchar(40), c_ch char(5), c_qchar \"char\", c_name name,
    c_bool bool, c_bytea bytea,
    c_date date, c_time time, c_time3 time(3), c_timetz timetz,
    c_ts timestamp, c_tstz timestamptz, c_tstz0 timestamptz(0), c_iv interval,
    c_uuid uuid, c_inet inet, c_cidr cidr, c_mac macaddr, c_mac8 macaddr8,
    c_jsonb jsonb, c_json json, c_xml xml,
    c_int_arr int[], c_text_arr text[], c_int_2d int[][], c_f8_arr float8[],
    c_mood mood, c_mood_arr mood[], c_comp pair_t, c_comp_arr pair_t[],
    c_i4r int4range, c_tstzr tstzrange, c_numr numrange, c_i4mr int4multirange,
    c_dom short_text, c_hs hstore,
    c_pt point, c_box box, c_box_arr box[], c_money money,
    c_bit bit(8), c_vbit varbit(16),
    c_tsv tsvector, c_tsq tsquery,
    c_lsn pg_lsn, c_oid oid
";

fn schema() -> String {
    format!(
        "
CREATE EXTENSION hstore;
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy', 'very \"happy\", (really)', 'it''s');
CREATE TYPE pair_t AS (label text, n integer, at timestamptz);
CREATE DOMAIN short_text AS text CHECK (length(VALUE) <= 12);
CREATE TABLE types_pk (id integer PRIMARY KEY, {COLUMNS});
CREATE TABLE types_full ({COLUMNS}, id integer);
ALTER TABLE types_full REPLICA IDENTITY FULL;
CREATE TABLE toasted (id integer PRIMARY KEY, n integer NOT NULL, big text, note text);
ALTER TABLE toasted ALTER COLUMN big SET STORAGE EXTERNAL;
"
    )
}

/// Column list and values of the edge rows, in `COLUMNS` order (without `id`).
const EDGE_COLS: &str = "c_int2, c_int4, c_int8, c_num, c_num_s, c_f4, c_f8,
    c_text, c_vc, c_ch, c_qchar, c_name, c_bool, c_bytea,
    c_date, c_time, c_time3, c_timetz, c_ts, c_tstz, c_tstz0, c_iv,
    c_uuid, c_inet, c_cidr, c_mac, c_mac8, c_jsonb, c_json, c_xml,
    c_int_arr, c_text_arr, c_int_2d, c_f8_arr, c_mood, c_mood_arr, c_comp, c_comp_arr,
    c_i4r, c_tstzr, c_numr, c_i4mr, c_dom, c_hs, c_pt, c_box, c_box_arr, c_money,
    c_bit, c_vbit, c_tsv, c_tsq, c_lsn, c_oid";

/// Edge values, one row per entry (each a VALUES tuple body without `id`).
fn edge_rows() -> Vec<String> {
    vec![
        // 1: extremes and special values.
        r#"-32768, -2147483648, -9223372036854775808,
           '123456789012345678901234567890.123456789012345678901234567890', '-99999999999999999999.9999',
           '-0', '-0',
           E'it''s "quoted", back\\slash \\\\ two, new\nline, tab\t, cr\r, bell\x07 end',
           E'ñandú 中文 😀 zero\u200bwidth', 'ab', 'x', 'a name with spaces',
           true, '\x00ff00'::bytea,
           '4713-01-01 BC', '00:00:00', '23:59:59.999', '23:59:59.999999-12',
           '0044-03-15 12:00:00 BC', '2024-03-10 02:30:00 America/New_York', '2024-06-30 23:59:59.6+05:45',
           '178000000 years -1 microsecond',
           'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '192.168.1.5/24', '10.0.0.0/8', '08:00:2b:01:02:03',
           '08:00:2b:01:02:03:04:05',
           '{"a": [1, 2.50, null, true, 1e400], "b": {"c": "\u00e9\"q\\ \u0001"}, "": "", "unicode": "😀"}',
           '{"dup": 1,   "dup": 2, "s": "\u0041\ud83d\ude00", "nul": "\u0000" }',
           '<a b="1">x &amp; y<!-- c --></a>',
           '{-2147483648,0,NULL,2147483647}',
           ARRAY['a,b', NULL, 'NULL', 'quo"te', 'back\slash', '{brace}', '', ' sp ', E'new\nline'],
           '{{1,2,3},{4,NULL,6}}',
           '{Infinity,-Infinity,NaN,-0,5e-324,1.7976931348623157e308}',
           'very "happy", (really)', '{sad,"it''s","very \"happy\", (really)",NULL}',
           ROW('commas, (parens) and "quotes" \ back', -1, '2000-01-01 00:00:00+14')::pair_t,
           ARRAY[ROW('a,b', 1, NULL)::pair_t, ROW(NULL, NULL, NULL)::pair_t, NULL],
           'empty', '[2024-01-01 00:00:00+02, infinity)', '(1.5,2.5]', '{[1,3), [5,7), [10,)}',
           'short, text', '"a"=>"1", "b"=>NULL, "quo\"te"=>"comma, here", "=>"=>""',
           '(1.5,-2.25)', '((0,0),(1e10,-1e-10))', '{(1,1),(0,0);(2.5,2.5),(-1,-1);NULL}',
           '-92233720368547758.08',
           B'10101010', B'1',
           $$a fat cat:1A sat:2,3 'quoted''s':4 'back\\slash'$$, $$fat & (rat | !cat) <-> 'it''s'$$,
           'FFFFFFFF/FFFFFFFF', 4294967295"#
            .to_string(),
        // 2: the other extremes, NaN and infinities.
        r#"32767, 2147483647, 9223372036854775807,
           'NaN', '1234567890123456.1234',
           'Infinity', '-Infinity',
           '', '', '', E'\\351', '',
           false, '\x'::bytea,
           'infinity', '24:00:00', '00:00:00.001', '00:00:00+14',
           '-infinity', 'infinity', '1970-01-01 00:00:00.5 Asia/Kolkata',
           '-1 mons +2 days -03:04:05.000001',
           '00000000-0000-0000-0000-000000000000', '::1', '2001:db8::/32', 'ff:ff:ff:ff:ff:ff',
           'ff:ff:ff:ff:ff:ff:ff:ff',
           '[]', '"only a string"', 'plain text<b/>',
           '{}', '{}', '{}', '{}',
           'it''s', '{}', ROW('', 0, 'infinity')::pair_t, '{}',
           '[1,1]', 'empty', '(,)', '{}',
           '', '', '(NaN,Infinity)', '((-1,-1),(1,1))', '{}', '0',
           B'00000000', B'',
           '', '!a',
           '0/0', 0"#
            .to_string(),
        // 3: small and ordinary values.
        r#"0, 1, -1,
           '-0.000000000000000000000000000001', '-0.0001',
           '1.4e-45', '2.2250738585072014e-308',
           ' leading and trailing spaces ', 'NULL', 'abcde', '\', 'NULL',
           NULL, decode(repeat('00', 300) || 'ff', 'hex'),
           '2000-02-29', '12:34:56.789012', '12:00:00.5', '12:34:56+05:30',
           '2000-02-29 12:34:56.789012', '2024-01-01 00:00:00 Pacific/Chatham', '2024-01-01 00:00:00.4 UTC',
           'P1Y2M3DT4H5M6.5S',
           'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', '2001:db8::1/64', '192.168.0.0/16', '08-00-2b-01-02-03',
           '08002b0102030405',
           '{"nested": {"deeper": {"deepest": [[], {}, [[1]]]}}, "num": -0.0, "big": 123456789012345678901234567890}',
           '[1, "two", {"three": 3}]', '<?xml version="1.0"?><root/>',
           '[0:2]={1,2,3}', '{"\"","\\",",","{","}"," "}', '[0:1][1:2]={{1,2},{3,4}}', '{0.1,0.2,0.30000000000000004}',
           'sad', '{ok,happy}', ROW(NULL, NULL, NULL)::pair_t, '{"(\",\",1,)"}',
           '(,5]', '(2024-01-01 00:00:00+00,2024-01-01 00:00:00+00]', 'empty', '{(,)}',
           'x', '', '(0,0)', '((0,0),(0,0))', NULL, '0.01',
           B'11111111', B'1111111111111111',
           'a:1 b:2 c:3', 'a:* & b:B',
           '1/0', 1"#
            .to_string(),
    ]
}

async fn insert_rows(blue: &Client, table: &str, ids: &[i32]) {
    let mut sql = String::from("BEGIN;");
    for (id, values) in ids.iter().zip(edge_rows()) {
        sql.push_str(&format!(
            "INSERT INTO {table} (id, {EDGE_COLS}) VALUES ({id}, {values});"
        ));
    }
    // A row of NULLs in every column but the key.
    sql.push_str(&format!("INSERT INTO {table} (id) VALUES (100);"));
    sql.push_str("COMMIT;");
    blue.batch_execute(&sql).await.expect("insert edge rows");
}

/// Changes some columns, sets others to NULL, fills the NULL row, deletes one row.
async fn change_rows(blue: &Client, table: &str) {
    blue.batch_execute(&format!(
        "BEGIN;
         UPDATE {table} SET c_text = c_text || E' \\\\ updated\\n', c_f4 = NULL, c_jsonb = NULL,
                c_int_arr = c_int_arr || NULL::int, c_comp = ROW(')(', 7, NULL)::pair_t,
                c_tstz = c_tstz + interval '1 microsecond', c_bytea = c_bytea || '\\x00'::bytea,
                c_hs = c_hs || 'new=>\"val,ue\"', c_num = NULL, c_mood = 'ok'
          WHERE id = 1;
         UPDATE {table} SET c_int2 = 7, c_text = 'was all NULL', c_bytea = '\\x00', c_dom = 'checked',
                c_text_arr = ARRAY[NULL, NULL]::text[], c_i4r = 'empty', c_money = '1234567.89',
                c_iv = '-1 day', c_timetz = '01:02:03-08', c_jsonb = 'null', c_json = 'null'
          WHERE id = 100;
         DELETE FROM {table} WHERE id = 3;
         COMMIT;"
    ))
    .await
    .expect("change edge rows");
    // Another transaction: update to all NULLs, and back to values in a later one.
    blue.batch_execute(&format!(
        "UPDATE {table} SET ({EDGE_COLS}) = (SELECT {EDGE_COLS} FROM {table} WHERE id = 100) WHERE id = 2"
    ))
    .await
    .expect("copy a row");
    blue.batch_execute(&format!(
        "INSERT INTO {table} (id, {EDGE_COLS}) SELECT 4, {EDGE_COLS} FROM {table} WHERE id = 1"
    ))
    .await
    .expect("copy a row");
}

async fn wait_until_same(pair: &Pair, table: &str) {
    let (blue, green) = (pair.blue().await, pair.green().await);
    let (b, g) = (&blue, &green);
    wait_for(&format!("{table} to match"), DEADLINE, || async move {
        rows(b, table).await == rows(g, table).await
    })
    .await;
}

async fn start_streaming(pair: &Pair) -> pipeline::Handle {
    let handle = pipeline::start(pair.config(), RunOptions::default())
        .await
        .expect("start the pipeline");
    wait_for("streaming", DEADLINE, || async { handle.shared.ready() }).await;
    handle
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_types_round_trip_through_inserts_updates_and_deletes() {
    init_logging();
    let pair = Pair::start(&schema());
    pair.blue
        .psql(
            DB,
            "CREATE PUBLICATION test_pub FOR TABLE types_pk, types_full",
        )
        .unwrap();
    let blue = pair.blue().await;
    // Rows that exist before the slot reach green through the initial copy.
    for table in ["types_pk", "types_full"] {
        for (id, values) in [201, 202].iter().zip(edge_rows()) {
            blue.batch_execute(&format!(
                "INSERT INTO {table} (id, {EDGE_COLS}) VALUES ({id}, {values})"
            ))
            .await
            .expect("insert rows before the slot");
        }
    }
    let handle = start_streaming(&pair).await;

    for table in ["types_pk", "types_full"] {
        insert_rows(&blue, table, &[1, 2, 3]).await;
    }
    // Wait between the steps, so that updates and deletes meet rows already in green instead
    // of being coalesced with their inserts.
    for table in ["types_pk", "types_full"] {
        wait_until_same(&pair, table).await;
    }
    for table in ["types_pk", "types_full"] {
        change_rows(&blue, table).await;
    }
    for table in ["types_pk", "types_full"] {
        wait_until_same(&pair, table).await;
    }
    // Inserted, updated and deleted in one transaction, and the rows' final states.
    for table in ["types_pk", "types_full"] {
        blue.batch_execute(&format!(
            "BEGIN;
             INSERT INTO {table} (id, {EDGE_COLS}) SELECT id + 1000, {EDGE_COLS} FROM {table};
             UPDATE {table} SET c_vc = 'updated in the same transaction', c_xml = NULL WHERE id > 1000;
             DELETE FROM {table} WHERE id = 1100;
             UPDATE {table} SET c_num_s = NULL, c_tsv = 'x:1' WHERE id = 1;
             COMMIT;"
        ))
        .await
        .expect("mixed transaction");
    }

    handle.drain().await.expect("drain");
    handle.wait().await.expect("pipeline result");
    let green = pair.green().await;
    for table in ["types_pk", "types_full"] {
        assert_eq!(count(&blue, table).await, 11, "{table} on blue");
        assert_eq!(count(&green, table).await, 11, "{table} on green");
    }
    assert_same(&pair, &["types_pk", "types_full"]).await;
}

/// (id, n, md5(big), length(big), note) of every row, by id.
async fn toast_digest(
    client: &Client,
) -> Vec<(i32, i32, Option<String>, Option<i32>, Option<String>)> {
    client
        .query(
            "SELECT id, n, md5(big), length(big), note FROM toasted ORDER BY id",
            &[],
        )
        .await
        .expect("toasted digest")
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

/// A value of about 1.3 MB that does not compress well (md5 hex digits), generated by blue.
fn big(seed: &str) -> String {
    format!("(SELECT string_agg(md5(i::text || '{seed}'), '') FROM generate_series(1, 40000) AS i)")
}

async fn wait_toast_same(pair: &Pair, step: &str) {
    let (blue, green) = (pair.blue().await, pair.green().await);
    let (b, g) = (&blue, &green);
    wait_for(step, DEADLINE, || async move {
        toast_digest(b).await == toast_digest(g).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unchanged_toast_values_keep_greens_copy() {
    init_logging();
    let pair = Pair::start(&schema());
    pair.blue
        .psql(DB, "CREATE PUBLICATION test_pub FOR TABLE toasted")
        .unwrap();
    let handle = start_streaming(&pair).await;
    let blue = pair.blue().await;

    blue.batch_execute(&format!(
        "INSERT INTO toasted VALUES (1, 0, {}, 'one'), (2, 0, {}, 'two'), (3, 0, {}, 'three')",
        big("a"),
        big("b"),
        big("c")
    ))
    .await
    .unwrap();
    wait_toast_same(&pair, "the large values to arrive").await;
    // Make sure the value really lives out of line on blue (else the test proves nothing).
    let out_of_line: bool = blue
        .query_one(
            "SELECT length(big) > 1000000
                    AND pg_relation_size(c.reltoastrelid) > 3 * 1000000
                    AND pg_relation_size('toasted') < 100000
               FROM toasted, pg_class c
              WHERE id = 1 AND c.oid = 'toasted'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        out_of_line,
        "the large values should live in the TOAST table"
    );

    // Another column only: blue sends the large value as "unchanged TOAST".
    blue.batch_execute("UPDATE toasted SET n = 1, note = NULL WHERE id = 1")
        .await
        .unwrap();
    wait_toast_same(&pair, "the update of another column").await;

    // The large value itself.
    blue.batch_execute(&format!(
        "UPDATE toasted SET big = {} WHERE id = 1",
        big("a2")
    ))
    .await
    .unwrap();
    wait_toast_same(&pair, "the update of the large value").await;

    // The key only: green must move the row keeping its copy of the large value.
    blue.batch_execute("UPDATE toasted SET id = 20 WHERE id = 2")
        .await
        .unwrap();
    wait_toast_same(&pair, "the key change").await;

    // Several changes of one row in one transaction: unchanged, changed, unchanged again, and
    // a large value set to NULL.
    blue.batch_execute(&format!(
        "BEGIN;
         UPDATE toasted SET n = 2 WHERE id = 1;
         UPDATE toasted SET big = {} WHERE id = 1;
         UPDATE toasted SET n = 3, note = 'after' WHERE id = 1;
         UPDATE toasted SET n = 4 WHERE id = 3;
         UPDATE toasted SET big = NULL WHERE id = 3;
         UPDATE toasted SET n = 5 WHERE id = 20;
         COMMIT;",
        big("a3")
    ))
    .await
    .unwrap();

    handle.drain().await.expect("drain");
    handle.wait().await.expect("pipeline result");
    let (blue, green) = (pair.blue().await, pair.green().await);
    let expected = toast_digest(&blue).await;
    assert_eq!(toast_digest(&green).await, expected);
    assert_eq!(
        expected.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>(),
        vec![(1, 3), (3, 4), (20, 5)]
    );
    assert!(expected[0].3.unwrap_or(0) > 1_000_000);
    assert_same(&pair, &["toasted"]).await;
}
