//! Table-driven tests of the rewriter, in the style of sqlparser-rs's round-trip helpers.

use super::*;

fn fk(schema: &str, table: &str, column: &str, ty: &str, parent: (&str, &str)) -> FkPlan {
    FkPlan {
        schema: schema.into(),
        table: table.into(),
        column: column.into(),
        uuid_column: format!("{column}_uuid"),
        column_type: ty.into(),
        parent_schema: parent.0.into(),
        parent_table: parent.1.into(),
        parent_key_column: "id".into(),
        parent_uuid_column: "id_uuid".into(),
    }
}

fn parent(schema: &str, table: &str) -> ParentPlan {
    ParentPlan {
        schema: schema.into(),
        table: table.into(),
        key_column: "id".into(),
        uuid_column: "id_uuid".into(),
    }
}

/// `public.p`; `public.c` (a child of `p` and of itself through `parent_id`, also a parent);
/// `app."Orders"` with the mixed-case FK `"AccountId"` to `app."Accounts"`.
pub(super) fn plan() -> PlanRules {
    PlanRules {
        parents: vec![parent("public", "p"), parent("public", "c"), parent("app", "Accounts")],
        fks: vec![
            fk("public", "c", "p_id", "bigint", ("public", "p")),
            fk("public", "c", "parent_id", "integer", ("public", "c")),
            fk("app", "Orders", "AccountId", "bigint", ("app", "Accounts")),
        ],
        columns: vec![
            TableColumns {
                schema: "public".into(),
                table: "c".into(),
                columns: ["id", "a", "p_id", "parent_id", "id_uuid", "p_id_uuid", "parent_id_uuid"]
                    .map(String::from)
                    .to_vec(),
            },
            TableColumns {
                schema: "app".into(),
                table: "Orders".into(),
                columns: ["id", "AccountId", "note", "AccountId_uuid"].map(String::from).to_vec(),
            },
        ],
        ..PlanRules::default()
    }
}

pub(super) fn forward() -> RuleSet {
    RuleSet::build(&plan(), Direction::Forward, ClientView::Physical, vec!["public".into()], 1).unwrap()
}

fn reverse() -> RuleSet {
    RuleSet::build(&plan(), Direction::Reverse, ClientView::Physical, vec!["public".into()], 2).unwrap()
}

#[test]
fn show() {
    let r = forward();
    for sql in std::fs::read_to_string("/tmp/ksrw/in.sql").unwrap().split("\n----\n") {
        println!("IN:  {sql}\nOUT: {:?}\n", rewrite(&r, sql));
    }
}
