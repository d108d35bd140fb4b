//! `#[derive(Syncable)]`: generates a Keel model's `Syncable` implementation from attributes.
//!
//! Struct attributes: `#[syncable(model = "entry", code = 2, domain = "index", priority = 30)]`
//! where `code` is the model's stable code in changes (a host's models take 32 to 254), `domain`
//! is `index`, `content`, `scope` (the type provides `fn scope_domain(&self) -> SyncDomain`) or
//! `parent:FIELD` (the domain of the record that FIELD references); optionally `version = N` (the
//! version of its changes, 0 first) and `upcast = "path::to::fn"` (a `keel_schema::Upcast`).
//! Field attributes: `uuid` (the record uuid, `Uuid` or `Option<Uuid>`), `skip` (not synced),
//! `references = "model"` (a dependency), `breaks_cycle` (a nullable reference applied in a
//! second step), `since = N` (the version that added the field; new fields go last) and
//! `default = "path::to::fn"` (its value in an upcast whole record; else `Default::default()`).

use proc_macro::TokenStream;
use proc_macro2::Span;
use quote::quote;
use syn::{parse_macro_input, Data, DeriveInput, Fields, LitInt, LitStr, Type};

/// Derives `keel_schema::Syncable`. See the crate docs for the attributes.
#[proc_macro_derive(Syncable, attributes(syncable))]
pub fn derive_syncable(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(tokens) => tokens.into(),
        Err(err) => err.to_compile_error().into(),
    }
}

struct FieldInfo {
    ident: syn::Ident,
    ty: Type,
    references: Option<String>,
    breaks_cycle: bool,
    since: u8,
    default: Option<syn::Path>,
}

enum DomainAttr {
    Index,
    Content,
    Scope,
    Parent(String),
}

fn is_option(ty: &Type) -> bool {
    match ty {
        Type::Path(p) => p
            .path
            .segments
            .last()
            .map(|s| s.ident == "Option")
            .unwrap_or(false),
        _ => false,
    }
}

/// The path to `keel_schema` from the deriving crate: `keel_schema` itself, under whatever name
/// the crate's manifest gives it, or re-exported as `keel_engine::schema` for a host that depends
/// on `keel-engine` alone.
fn schema_path() -> proc_macro2::TokenStream {
    use proc_macro_crate::{crate_name, FoundCrate};
    let named = |name: &str| {
        let ident = syn::Ident::new(name, Span::call_site());
        quote!(::#ident)
    };
    match crate_name("keel-schema") {
        Ok(FoundCrate::Itself) => quote!(::keel_schema),
        Ok(FoundCrate::Name(name)) => named(&name),
        Err(_) => match crate_name("keel-engine") {
            Ok(FoundCrate::Name(name)) => {
                let engine = named(&name);
                quote!(#engine::schema)
            }
            Ok(FoundCrate::Itself) => quote!(crate::schema),
            Err(_) => quote!(::keel_schema),
        },
    }
}

fn expand(input: &DeriveInput) -> syn::Result<proc_macro2::TokenStream> {
    let k = schema_path();
    let name = &input.ident;
    let StructAttrs {
        model,
        domain,
        priority,
        permanent_delete,
        code,
        version,
        upcast,
    } = struct_attrs(input)?;
    let ModelFields {
        uuid: (uuid_ident, uuid_is_option),
        synced,
        skipped,
    } = model_fields(input)?;
    let field_defs = synced.iter().map(|f| {
        let fname = f.ident.to_string();
        let ty = &f.ty;
        let references = match &f.references {
            Some(r) => quote!(::core::option::Option::Some(#r)),
            None => quote!(::core::option::Option::None),
        };
        let breaks_cycle = f.breaks_cycle;
        let since = f.since;
        let default = match &f.default {
            Some(path) => quote!(|| #k::FieldValue::into_value(#path())),
            None => quote!(|| #k::FieldValue::into_value(
                <#ty as ::core::default::Default>::default()
            )),
        };
        quote! {
            #k::FieldDef {
                name: #fname,
                ty: <#ty as #k::FieldValue>::TYPE,
                nullable: <#ty as #k::FieldValue>::NULLABLE,
                references: #references,
                breaks_cycle: #breaks_cycle,
                since: #since,
                default: #default,
            }
        }
    });
    if let Some(late) = synced.iter().find(|f| f.since > version) {
        return Err(syn::Error::new_spanned(
            &late.ident,
            "syncable: a field's `since` is at most the model's `version`",
        ));
    }
    if synced.windows(2).any(|w| w[1].since < w[0].since) {
        return Err(syn::Error::new(
            Span::call_site(),
            "syncable: fields added by a later version go after the older ones (a change names a field by its position)",
        ));
    }
    let upcast = match upcast {
        Some(path) => quote!(::core::option::Option::Some(#path)),
        None => quote!(::core::option::Option::None),
    };
    let skipped_names = skipped.iter().map(|s| s.to_string());
    let uuid_name = uuid_ident.to_string();
    let (domain_rule, domain_body) = domain_tokens(&k, &domain, &synced)?;
    let to_values = synced.iter().map(|f| {
        let ident = &f.ident;
        quote!(#k::FieldValue::to_value(&self.#ident))
    });
    if synced.len() > usize::from(u8::MAX) {
        return Err(syn::Error::new(
            Span::call_site(),
            "syncable: a model has at most 255 synced fields (a change names them by a u8 index)",
        ));
    }
    let into_values = synced.iter().enumerate().map(|(i, f)| {
        let ident = &f.ident;
        let index = i as u8;
        quote!((#index, #k::FieldValue::into_value(self.#ident)))
    });
    let from_values = synced.iter().enumerate().map(|(i, f)| {
        let ident = &f.ident;
        let ty = &f.ty;
        quote!(#ident: <#ty as #k::FieldValue>::from_value(values.get(#i)?)?)
    });
    let skipped_init = skipped
        .iter()
        .map(|s| quote!(#s: ::core::default::Default::default()));
    let record_uuid = if uuid_is_option {
        quote!(self.#uuid_ident)
    } else {
        quote!(::core::option::Option::Some(self.#uuid_ident))
    };
    let uuid_init = if uuid_is_option {
        quote!(#uuid_ident: ::core::option::Option::Some(uuid))
    } else {
        quote!(#uuid_ident: uuid)
    };
    let field_count = synced.len();
    let vis = &input.vis;
    let update = quote::format_ident!("{}Update", name);
    let update_doc = format!(
        "Typed updates of some fields of one `{name}` record (made by `#[derive(Syncable)]`): \
         `{update}::new(uuid)` then one setter per field to write, handed to `Tx::set`."
    );
    let setters = synced.iter().enumerate().map(|(i, f)| {
        let ident = &f.ident;
        let ty = &f.ty;
        let index = i as u8;
        let doc = format!("Writes `{ident}`.");
        quote! {
            #[doc = #doc]
            #[must_use]
            pub fn #ident(mut self, value: #ty) -> Self {
                self.fields.push((#index, #k::FieldValue::into_value(value)));
                self
            }
        }
    });
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let lookup_ident = if matches!(domain, DomainAttr::Parent(_)) {
        quote!(lookup)
    } else {
        quote!(_lookup)
    };

    Ok(quote! {
        impl #impl_generics #k::Syncable for #name #ty_generics #where_clause {
            const DEF: &'static #k::ModelDef = &#k::ModelDef {
                name: #model,
                code: #code,
                version: #version,
                upcast: #upcast,
                uuid_field: #uuid_name,
                domain: #domain_rule,
                fields: &[#(#field_defs),*],
                skipped: &[#(#skipped_names),*],
                priority: #priority,
                permanent_delete: #permanent_delete,
            };

            fn record_uuid(&self) -> ::core::option::Option<#k::uuid::Uuid> {
                #record_uuid
            }

            fn field_values(&self) -> ::std::vec::Vec<#k::Value> {
                ::std::vec![#(#to_values),*]
            }

            fn into_indexed_values(self) -> ::std::vec::Vec<(u8, #k::Value)> {
                ::std::vec![#(#into_values),*]
            }

            fn from_field_values(
                uuid: #k::uuid::Uuid,
                values: &[#k::Value],
            ) -> ::core::option::Option<Self> {
                if values.len() != #field_count {
                    return ::core::option::Option::None;
                }
                ::core::option::Option::Some(Self {
                    #uuid_init,
                    #(#from_values,)*
                    #(#skipped_init,)*
                })
            }

            fn sync_domain(&self, #lookup_ident: &dyn #k::DomainLookup) -> #k::SyncDomain {
                #domain_body
            }
        }

        #[doc = #update_doc]
        #[derive(Clone, Debug, PartialEq)]
        #vis struct #update {
            record: #k::uuid::Uuid,
            fields: ::std::vec::Vec<(u8, #k::Value)>,
        }

        impl #update {
            /// An update of record `record` that writes nothing yet.
            pub fn new(record: #k::uuid::Uuid) -> Self {
                Self { record, fields: ::std::vec::Vec::new() }
            }
            #(#setters)*
        }

        impl #k::FieldUpdate for #update {
            type Model = #name;
            fn record(&self) -> #k::uuid::Uuid {
                self.record
            }
            fn into_fields(self) -> ::std::vec::Vec<(u8, #k::Value)> {
                self.fields
            }
        }
    })
}

/// What `#[syncable(...)]` on the struct says.
struct StructAttrs {
    model: String,
    domain: DomainAttr,
    priority: u8,
    permanent_delete: bool,
    code: u8,
    version: u8,
    upcast: Option<syn::Path>,
}

fn struct_attrs(input: &DeriveInput) -> syn::Result<StructAttrs> {
    let mut model: Option<String> = None;
    let mut domain: Option<DomainAttr> = None;
    let mut priority: u8 = 50;
    let mut permanent_delete = false;
    let mut code: Option<u8> = None;
    let mut version: u8 = 0;
    let mut upcast: Option<syn::Path> = None;
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("syncable")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("model") {
                model = Some(meta.value()?.parse::<LitStr>()?.value());
            } else if meta.path.is_ident("permanent_delete") {
                permanent_delete = true;
            } else if meta.path.is_ident("priority") {
                priority = meta.value()?.parse::<LitInt>()?.base10_parse()?;
            } else if meta.path.is_ident("code") {
                let lit = meta.value()?.parse::<LitInt>()?;
                let value: u8 = lit.base10_parse()?;
                if value == u8::MAX {
                    return Err(syn::Error::new(lit.span(), "syncable: code 255 is reserved"));
                }
                code = Some(value);
            } else if meta.path.is_ident("version") {
                version = meta.value()?.parse::<LitInt>()?.base10_parse()?;
            } else if meta.path.is_ident("upcast") {
                upcast = Some(meta.value()?.parse::<LitStr>()?.parse()?);
            } else if meta.path.is_ident("domain") {
                let lit = meta.value()?.parse::<LitStr>()?;
                let text = lit.value();
                domain = Some(match text.as_str() {
                    "index" => DomainAttr::Index,
                    "content" => DomainAttr::Content,
                    "scope" => DomainAttr::Scope,
                    other => match other.strip_prefix("parent:") {
                        Some(field) => DomainAttr::Parent(field.to_string()),
                        None => {
                            return Err(syn::Error::new(
                                lit.span(),
                                "syncable: domain must be \"index\", \"content\", \"scope\" or \"parent:FIELD\"",
                            ))
                        }
                    },
                });
            } else {
                return Err(meta.error(
                    "syncable: unknown struct attribute; expected `model`, `code`, `domain`, `priority`, `version`, `upcast` or `permanent_delete`",
                ));
            }
            Ok(())
        })?;
    }
    let model = model.ok_or_else(|| {
        syn::Error::new(
            Span::call_site(),
            "syncable: missing #[syncable(model = \"name\")] on the struct",
        )
    })?;
    let code = code.ok_or_else(|| {
        syn::Error::new(
            Span::call_site(),
            "syncable: missing #[syncable(code = N)] on the struct: the model's stable code in changes (a host's models take 32 to 254)",
        )
    })?;
    let domain = domain.ok_or_else(|| {
        syn::Error::new(
            Span::call_site(),
            "syncable: missing #[syncable(domain = \"...\")] on the struct",
        )
    })?;
    Ok(StructAttrs {
        model,
        domain,
        priority,
        permanent_delete,
        code,
        version,
        upcast,
    })
}

/// The struct's fields: the uuid field (and whether it is an `Option`), the synced fields in
/// order, the skipped ones.
struct ModelFields {
    uuid: (syn::Ident, bool),
    synced: Vec<FieldInfo>,
    skipped: Vec<syn::Ident>,
}

fn model_fields(input: &DeriveInput) -> syn::Result<ModelFields> {
    let Data::Struct(data) = &input.data else {
        return Err(syn::Error::new(
            Span::call_site(),
            "syncable: only structs with named fields can be Syncable",
        ));
    };
    let Fields::Named(named) = &data.fields else {
        return Err(syn::Error::new(
            Span::call_site(),
            "syncable: only structs with named fields can be Syncable",
        ));
    };

    let mut uuid_field: Option<(syn::Ident, bool)> = None;
    let mut synced: Vec<FieldInfo> = Vec::new();
    let mut skipped: Vec<syn::Ident> = Vec::new();
    for field in &named.named {
        let Some(ident) = field.ident.clone() else {
            continue;
        };
        let mut is_uuid = false;
        let mut skip = false;
        let mut references = None;
        let mut breaks_cycle = false;
        let mut since = 0u8;
        let mut default = None;
        for attr in field.attrs.iter().filter(|a| a.path().is_ident("syncable")) {
            attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("uuid") {
                    is_uuid = true;
                } else if meta.path.is_ident("skip") {
                    skip = true;
                } else if meta.path.is_ident("references") {
                    references = Some(meta.value()?.parse::<LitStr>()?.value());
                } else if meta.path.is_ident("breaks_cycle") {
                    breaks_cycle = true;
                } else if meta.path.is_ident("since") {
                    since = meta.value()?.parse::<LitInt>()?.base10_parse()?;
                } else if meta.path.is_ident("default") {
                    default = Some(meta.value()?.parse::<LitStr>()?.parse()?);
                } else {
                    return Err(meta.error(
                        "syncable: unknown field attribute; expected `uuid`, `skip`, `references = \"model\"`, `breaks_cycle`, `since = N` or `default = \"path\"`",
                    ));
                }
                Ok(())
            })?;
        }
        if breaks_cycle && (references.is_none() || !is_option(&field.ty)) {
            return Err(syn::Error::new_spanned(
                &field.ty,
                "syncable: `breaks_cycle` needs `references = \"model\"` on an Option field",
            ));
        }
        if is_uuid {
            if uuid_field.is_some() {
                return Err(syn::Error::new_spanned(
                    &ident,
                    "syncable: only one field can be #[syncable(uuid)]",
                ));
            }
            uuid_field = Some((ident, is_option(&field.ty)));
        } else if skip {
            skipped.push(ident);
        } else {
            synced.push(FieldInfo {
                ident,
                ty: field.ty.clone(),
                references,
                breaks_cycle,
                since,
                default,
            });
        }
    }
    let (uuid_ident, uuid_is_option) = uuid_field.ok_or_else(|| {
        syn::Error::new(
            Span::call_site(),
            "syncable: one field must be marked #[syncable(uuid)]",
        )
    })?;
    Ok(ModelFields {
        uuid: (uuid_ident, uuid_is_option),
        synced,
        skipped,
    })
}

/// The domain rule of `ModelDef` and the body of `sync_domain`.
fn domain_tokens(
    k: &proc_macro2::TokenStream,
    domain: &DomainAttr,
    synced: &[FieldInfo],
) -> syn::Result<(proc_macro2::TokenStream, proc_macro2::TokenStream)> {
    Ok(match domain {
        DomainAttr::Index => (
            quote!(#k::DomainRule::Fixed(
                #k::SyncDomain::Index
            )),
            quote!(#k::SyncDomain::Index),
        ),
        DomainAttr::Content => (
            quote!(#k::DomainRule::Fixed(
                #k::SyncDomain::Content
            )),
            quote!(#k::SyncDomain::Content),
        ),
        DomainAttr::Scope => (quote!(#k::DomainRule::ByScope), quote!(self.scope_domain())),
        DomainAttr::Parent(field) => {
            let Some(parent) = synced.iter().find(|f| f.ident == field.as_str()) else {
                return Err(syn::Error::new(
                    Span::call_site(),
                    format!("syncable: domain parent field `{field}` is not a synced field"),
                ));
            };
            let Some(parent_model) = parent.references.clone() else {
                return Err(syn::Error::new_spanned(
                    &parent.ident,
                    "syncable: a domain parent field needs `references = \"model\"`",
                ));
            };
            let pident = &parent.ident;
            (
                quote!(#k::DomainRule::ByParent(#field)),
                quote! {
                    lookup
                        .domain_of(#parent_model, ::core::convert::Into::into(self.#pident))
                        .unwrap_or(#k::SyncDomain::Index)
                },
            )
        }
    })
}
